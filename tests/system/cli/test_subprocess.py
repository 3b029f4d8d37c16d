"""The installed ``buildq`` command as an operator runs it: a real process, no TTY."""

from __future__ import annotations

import json
import subprocess

from tests.support.daemon import BUILDQ
from tests.support.tables import msg, snapshot


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BUILDQ, *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60
    )


def test_topics_json_from_a_real_process(backend_url, queue, subscribe):
    subscribe("t")
    queue.publish("t", msg("a"))

    result = _run("queue", "topics", "--json", "--url", backend_url)

    assert result.returncode == 0, result.stderr
    [topic] = json.loads(result.stdout)
    assert (topic["topic"], topic["messages"], topic["groups"][0]["ready"]) == ("t", 1, 1)


def test_purge_without_yes_and_no_terminal_refuses(backend_url, db, queue):
    queue.publish("t", msg("a"))
    before = snapshot(db)

    result = _run("queue", "purge", "--topic", "t", "--url", backend_url)

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "refusing without --yes" in result.stderr
    assert snapshot(db) == before


def test_doctor_exit_status_gates_a_deploy(backend_url, tmp_path):
    assert _run("doctor", "--url", backend_url).returncode == 0
    missing = _run("doctor", "--url", f"sqlite:///{tmp_path / 'none.db'}")
    assert missing.returncode == 1 and "fix: run" in missing.stdout


def test_publish_json_stays_parseable_for_a_duplicate(backend_url):
    argv = ["queue", "publish", "--topic", "t", "--id", "a", "--partition", "p"]
    argv += ["--payload", "{}", "--json", "--url", backend_url]
    assert _run(*argv).returncode == 0

    again = _run(*argv)

    assert json.loads(again.stdout)["duplicate"] is True
