"""The status page with 10,000 builds in the database: how long each page takes, how big it is.

    python -m bench.web_pages                  # SQLite and MariaDB (when reachable)
    python -m bench.web_pages --backend sqlite --builds 10000 --rounds 15

Seeds a fresh database through SQLAlchemy Core (the shapes the daemon writes): ``--builds``
builds, a tenth of them in flight and the rest finished within the last hour (the worst case
for the overview's last-hour queries), each with its request, its poll chain (8 polls) and, if
finished, its result message; plus 20 dead letters. Then runs ``buildq web`` as a process and
times each page over HTTP (median and p90 of ``--rounds`` requests after one warm-up), and, when
Debian's Chromium is installed, a full page load in the browser (navigation timing: HTML,
DOMContentLoaded, load; bytes transferred including the script and stylesheet).
Results are printed; docs/web.md keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from bench.databases import fresh_database, mysql_available
from buildq.orchestrator.schema import builds
from buildq.queue.sql.schema import messages

POLLS = 8
PAGES = ["/", "/builds", "/build?id=req-00000042", "/queue", "/api/overview", "/api/builds"]
BUILDQ = str(Path(sys.executable).parent / "buildq")


def seed(url: str, count: int) -> None:
    engine = sa.create_engine(url)
    rng = random.Random(7)
    now = int(time.time() * 1000)
    build_rows, message_rows = [], []
    for n in range(count):
        rid, bid = f"req-{n:08d}", f"sim-{n:08d}"
        live = n % 10 == 0
        created = now - rng.randint(30_000, 3_540_000)
        finished = None if live else min(now - 1_000, created + rng.randint(20_000, 600_000))
        status = (
            rng.choice(["ACCEPTED", "RUNNING"])
            if live
            else rng.choice(["SUCCEEDED"] * 7 + ["FAILED"] * 2 + ["CANCELLED"])
        )
        reason = {"FAILED": "verdict", "CANCELLED": "cancelled"}.get(status)
        changes = {
            "base": [{"id": "base-1", "revision": "b1"}],
            "head": [{"id": f"c-{n}", "revision": "r1"}],
        }
        build_rows.append(
            {
                "request_id": rid,
                "build_id": bid,
                "queue": rng.choice(["main", "main", "release"]),
                "runner": "sim",
                "status": status,
                "failure_reason": reason,
                "metadata": json.dumps({"url": f"https://ci.example/{n}"}),
                "request_metadata": json.dumps({"requester": "bench"}),
                "changes": json.dumps(changes),
                "polls": POLLS,
                "created_at": created,
                "updated_at": finished or now,
                "finished_at": finished,
                "next_poll_at": None if finished else now + 5_000,
            }
        )
        message_rows.append(_message("build", rid, f"{rid}/request", created - 50, 0))
        step = ((finished or now) - created) // (POLLS + 1)
        for poll in range(1, POLLS + 1):
            made = created + (poll - 1) * step
            message_rows.append(
                _message(
                    "buildsignal",
                    bid,
                    f"{bid}/poll/{poll}",
                    made,
                    made + step - rng.randint(0, 300),
                )
            )
        if finished:
            message_rows.append(_message("buildresult", rid, f"{rid}/result", finished, 0))
    for n in range(20):
        letter = _message("buildsignal_dlq", f"sim-{n:08d}", f"sim-{n:08d}/poll/9", now - 60_000, 0)
        letter.update(
            dlq_group="buildq",
            original_topic="buildsignal",
            failed_at=now - 60_000,
            failure_count=5,
            last_error="runner said 502",
        )
        message_rows.append(letter)
    with engine.begin() as conn:
        for i in range(0, len(build_rows), 2_000):
            conn.execute(sa.insert(builds), build_rows[i : i + 2_000])
        for i in range(0, len(message_rows), 5_000):
            conn.execute(sa.insert(messages), message_rows[i : i + 5_000])
    engine.dispose()


def _message(topic: str, key: str, mid: str, created: int, visible_after: int) -> dict[str, Any]:
    return {
        "topic": topic,
        "partition_key": key,
        "message_id": mid,
        "dlq_group": "",
        "payload": json.dumps({"id": key}).encode(),
        "metadata": "{}",
        "created_at": created,
        "visible_after": visible_after,
    }


def serve(url: str, directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = directory / "config" / "buildq.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        f'[database]\nurl = "{url}"\n\n[daemon]\nlog_format = "json"\n\n'
        '[runners.sim]\ntype = "sim"\n\n[queues.main]\nrunner = "sim"\n\n'
        '[queues.release]\nrunner = "sim"\n\n[web]\nport = 0\n'
    )
    log = directory / "web.log"
    process = subprocess.Popen(
        [BUILDQ, "web", "--config", str(config)], stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"web_listening"' in line:
                return process, json.loads(line)["url"].rstrip("/")
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"buildq web did not start: {log.read_text()[-2000:]}")


def time_pages(base: str, rounds: int) -> list[dict[str, Any]]:
    out = []
    with httpx.Client(base_url=base, timeout=60) as http:
        for page in PAGES:
            http.get(page).raise_for_status()  # warm-up: connections, caches, templates
            times, size = [], 0
            for _ in range(rounds):
                started = time.perf_counter()
                answer = http.get(page)
                times.append((time.perf_counter() - started) * 1000)
                answer.raise_for_status()
                size = len(answer.content)
            times.sort()
            out.append(
                {
                    "page": page,
                    "median_ms": statistics.median(times),
                    "p90_ms": times[int(0.9 * (len(times) - 1))],
                    "bytes": size,
                }
            )
    return out


def browser_loads(base: str, rounds: int) -> list[dict[str, Any]]:
    try:
        from tests.support.web import CHROMEDRIVER, CHROMIUM, start_chromium
    except ImportError:
        return []
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        return []
    driver = start_chromium(Path(tempfile.mkdtemp(prefix="buildq-bench-chromium-")))
    script = (
        "var n = performance.getEntriesByType('navigation')[0];"
        "var bytes = performance.getEntriesByType('resource').reduce(function (s, r) { return s + r.transferSize; }, n.transferSize);"
        "return [n.responseEnd - n.requestStart, n.domContentLoadedEventEnd, n.loadEventEnd, bytes];"
    )
    out = []
    try:
        for page in ("/", "/builds", "/queue"):
            samples = []
            for _ in range(rounds):
                driver.get(base + page)
                samples.append(driver.execute_script(script))
            html, dcl, load, transferred = (
                statistics.median(s[i] for s in samples) for i in range(4)
            )
            out.append(
                {
                    "page": page,
                    "html_ms": html,
                    "dom_content_loaded_ms": dcl,
                    "load_ms": load,
                    "transferred_bytes": transferred,
                }
            )
    finally:
        driver.quit()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web_pages")
    parser.add_argument("--backend", choices=("all", "sqlite", "mysql"), default="all")
    parser.add_argument("--builds", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    backends = ["sqlite", "mysql"] if args.backend == "all" else [args.backend]
    if "mysql" in backends and (why := mysql_available()) is not None:
        print(f"MariaDB unavailable, skipped: {why}")
        backends.remove("mysql")
    for name in backends:
        with fresh_database(name, "web") as backend, tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            seed(backend.url, args.builds)
            print(f"[{name}] seeded {args.builds} builds in {time.monotonic() - started:.1f}s")
            process, base = serve(backend.url, Path(tmp))
            try:
                for row in time_pages(base, args.rounds):
                    print(
                        f"[{name}] GET {row['page']:<26} median {row['median_ms']:7.1f} ms  p90 {row['p90_ms']:7.1f} ms  {row['bytes'] / 1024:7.1f} KiB"
                    )
                for row in browser_loads(base, max(3, args.rounds // 3)):
                    print(
                        f"[{name}] chromium {row['page']:<8} html {row['html_ms']:6.1f} ms  DOMContentLoaded {row['dom_content_loaded_ms']:6.1f} ms  load {row['load_ms']:6.1f} ms  {row['transferred_bytes'] / 1024:6.1f} KiB transferred"
                    )
            finally:
                process.terminate()
                process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
