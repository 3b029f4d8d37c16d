"""``buildq run`` with a runner kind that only an installed plugin provides."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.support.daemon import DaemonProcess, World
from tests.system.e2e.test_ci_backends import assert_one_chain_each, wait_terminal

CONFIG = """
[runners.good]
type = "example"

[runners.bad]
type = "example"
outcome = "fail"

[queues.main]
runner = "good"

[queues.other]
runner = "bad"
"""


def test_the_daemon_runs_builds_on_a_plugin_runner(
    plugin_site: Path, daemon: Callable[..., DaemonProcess], world: World
) -> None:
    d = daemon(CONFIG, env={"PYTHONPATH": str(plugin_site)}).start()
    passes = world.submit("main", 2)
    fails = world.submit("other", 1, prefix="other")
    wait_terminal(world, 3)
    outcomes = {r.request_id: (r.status, r.runner) for r in world.builds()}
    assert outcomes == {
        **{r: ("SUCCEEDED", "good") for r in passes},
        **{r: ("FAILED", "bad") for r in fails},
    }
    assert_one_chain_each(world)
    assert d.stop() == 0
