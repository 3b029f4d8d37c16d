"""Runner plugins: an installed example plugin is a runner kind like the built-ins; a missing or
broken one is a one-line config error naming the package."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from buildq.buildrunner import registry
from buildq.buildrunner.contract import BuildID, BuildStatus, Change
from buildq.config.base import ConfigError, Secret, Table
from buildq.webhook import WebhookConfig, WebhookServer, route_for
from tests.support.daemon import BUILDQ
from tests.support.plugin_example import DISTRIBUTION


@pytest.fixture
def on_path(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(plugin_site))
    return plugin_site


def broken_site(root: Path, target: str) -> Path:
    """A directory holding an installed distribution whose entry point cannot load."""
    dist = root / "buildq_broken_runner-0.3.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: buildq-broken-runner\nVersion: 0.3\n"
    )
    (dist / "entry_points.txt").write_text(f"[buildq.runners]\nbroken = {target}\n")
    return root


def test_the_plugin_is_a_kind_like_the_built_ins(on_path: Path) -> None:
    assert "example" in registry.kind_names()
    kind = registry.get("example")
    assert kind.source == DISTRIBUTION
    config = kind.validate(Table("runners.ex", {"type": "example", "outcome": "fail"}))
    runner = kind.factory("ex", config)
    assert runner.status(runner.trigger("q", [], [Change("c")]))[0] is BuildStatus.FAILED
    # Its config is validated like a built-in's: unknown keys and bad values name the key.
    with pytest.raises(ConfigError, match=r"runners\.ex\.outcom"):
        kind.validate(Table("runners.ex", {"type": "example", "outcom": "pass"}))
    with pytest.raises(ConfigError, match=r"runners\.ex\.outcome"):
        kind.validate(Table("runners.ex", {"type": "example", "outcome": "maybe"}))


def test_the_webhook_receiver_serves_a_plugin_kind(on_path: Path) -> None:
    kind = registry.get("example")

    class Hooked:
        webhook_secret = Secret("hook-SECRET", "env:X")

    route = route_for("ex", Hooked(), "example")
    assert route is not None and kind.webhook is not None
    seen: list[BuildID] = []
    server = WebhookServer(WebhookConfig(enabled=True), [route], lambda _r, b: seen.append(b))
    body = b'{"build": "example-pass-0123456789ab-1"}'
    assert server.handle(route, {"x-example-token": "nope"}, body).status == 401
    assert server.handle(route, {"x-example-token": "hook-SECRET"}, body).status == 202
    assert server.handle(route, {"x-example-token": "hook-SECRET"}, b"{}").status == 200
    assert seen == [BuildID("example-pass-0123456789ab-1")]


def test_a_missing_kind_names_the_entry_point_group() -> None:
    with pytest.raises(ConfigError) as missing:
        registry.for_table(Table("runners.x", {"type": "nosuch"}))
    assert str(missing.value).startswith("config runners.x.type = 'nosuch'")
    assert "buildq.runners" in str(missing.value) and "\n" not in str(missing.value)


@pytest.mark.parametrize(
    ("target", "why"),
    [("buildq_no_such_module:KIND", "ModuleNotFoundError"), ("json:dumps", "not a RunnerKind")],
)
def test_a_broken_plugin_is_one_line_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, why: str
) -> None:
    monkeypatch.syspath_prepend(str(broken_site(tmp_path, target)))
    with pytest.raises(ConfigError) as broken:
        registry.for_table(Table("runners.b", {"type": "broken"}))
    text = str(broken.value)
    assert text.startswith("config runners.b.type = 'broken'") and "\n" not in text
    assert "buildq-broken-runner 0.3" in text and why in text


def _buildq(args: list[str], site: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [BUILDQ, *args], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )


def _config(tmp_path: Path, runner: str) -> Path:
    config = tmp_path / "config" / "buildq.toml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/b.db"\n\n[runners.ex]\n{runner}\n')
    return config


def test_doctor_lists_the_plugin_and_a_broken_one(plugin_site: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, 'type = "example"\noutcome = "pass"')
    done = _buildq(["doctor", "--config", str(config)], plugin_site, tmp_path)
    assert f"runner type example from {DISTRIBUTION}" in done.stdout, done.stdout
    assert f"type example (plugin {DISTRIBUTION}): config and secrets resolve" in done.stdout
    [hook] = [ln for ln in done.stdout.splitlines() if "runner ex outcome" in ln]
    assert hook.startswith("ok") and hook.endswith("every build ends pass")  # its doctor hook

    broken = broken_site(tmp_path / "broken", "buildq_no_such_module:KIND")
    path = f"{plugin_site}{os.pathsep}{broken}"
    done = _buildq(["doctor", "--config", str(config)], Path(path), tmp_path)
    [line] = [ln for ln in done.stdout.splitlines() if "plugin broken" in ln]
    assert line.startswith("FAIL") and "buildq-broken-runner 0.3" in line
    assert done.returncode == 1

    refused = _buildq(
        ["run", "--config", str(_config(tmp_path, 'type = "broken"'))], broken, tmp_path
    )
    assert refused.returncode != 0
    [message] = refused.stderr.strip().splitlines()
    assert "runners.ex.type" in message and "buildq-broken-runner 0.3" in message
