"""A stop while the database is down is bounded by the grace plus a few seconds, and loses
nothing: what could not be handed back is left to the visibility timeout and the lease expiry,
and a daemon started after the outage finishes every build (issue 14, item 3)."""

from __future__ import annotations

import signal
import time

from tests.support.daemon import DaemonProcess, World, write_config
from tests.support.waiting import wait_until
from tests.system.ops.conftest import ProxiedDatabase

GRACE_S = 2
#: The daemon's own margin (5 s) plus process exit on a loaded machine.
BOUND_S = GRACE_S + 10

SIM = """
[runners.sim]
type = "sim"
accepted_s = 0.0
running_s = 0.0
failure_probability = 0.0
polls = 20

[poll]
accepted_interval_s = 0.2
running_interval_s = 0.2
growth = 1.0
jitter = 0.0

[queues.main]
runner = "sim"
"""


def test_sigterm_while_the_database_is_down_exits_within_the_grace(
    proxied_database: ProxiedDatabase, world: World, tmp_path
) -> None:
    proxy = proxied_database.proxy
    config = write_config(tmp_path / "config", proxied_database.url, SIM)
    grace = {"BUILDQ_DAEMON__SHUTDOWN_GRACE_S": str(GRACE_S)}
    first = DaemonProcess(config, tmp_path, grace)
    try:
        first.start()
        requests = world.submit("main", 20)
        wait_until(
            lambda: world.rows("SELECT COUNT(*) AS n FROM builds WHERE polls >= 2")[0].n == 20,
            timeout=60,
            message="every build in flight, polled",
        )
        proxy.cut()
        started = time.monotonic()
        first.signal(signal.SIGTERM)
        code = first.process.wait(timeout=BOUND_S + 30)
        took = time.monotonic() - started
        assert took < BOUND_S, (took, first.log_text()[-2000:])
        assert code == 0, first.log_text()[-2000:]

        proxy.listen()
        second = first.start()  # the same process wrapper: a second run, its own log
        wait_until(lambda: world.all_terminal(len(requests)), timeout=120, message="all finished")
        assert {r.status for r in world.builds()} == {"SUCCEEDED"}
        assert world.results_per_request() == {r: 1 for r in requests}
        world.check_one_live_poll()
        assert second.stop() == 0
    finally:
        first.cleanup()
