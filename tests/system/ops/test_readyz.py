"""/readyz follows the database: red while it is unreachable, green again when it returns;
/healthz and /metrics keep answering meanwhile, and the daemon picks its work up again."""

from __future__ import annotations

from tests.support.daemon import DaemonProcess, noop_queue, write_config
from tests.support.scrape import get, ops_port, scrape
from tests.support.waiting import wait_until

NOOP = noop_queue("fast")

#: The probe runs every 2 s; a failing one flips /readyz at once.
DOWN_WITHIN_S = 10
#: Back within a probe or two once connections succeed again.
UP_WITHIN_S = 20


def status(port: int, path: str) -> int:
    return get(port, path).status_code


def test_readyz_goes_red_while_the_database_is_unreachable_and_green_after(
    proxied_database, world, tmp_path
):
    proxy = proxied_database.proxy
    config = write_config(tmp_path / "config", proxied_database.url, NOOP)
    d = DaemonProcess(config, tmp_path, {"BUILDQ_HTTP__METRICS_REFRESH_S": "0.5"})
    try:
        d.start()
        port = ops_port(d)
        wait_until(lambda: status(port, "/readyz") == 200, message="ready")
        world.submit("fast", 3, prefix="before")
        wait_until(lambda: world.all_terminal(3), timeout=30, message="builds before the outage")

        proxy.cut()
        wait_until(lambda: status(port, "/readyz") == 503, timeout=DOWN_WITHIN_S, message="red")
        assert "database unavailable" in get(port, "/readyz").text
        assert status(port, "/healthz") == 200, get(port, "/healthz").text
        wait_until(lambda: scrape(port).value("buildq_database_up") == 0, timeout=DOWN_WITHIN_S)

        proxy.listen()  # the same port again
        wait_until(lambda: status(port, "/readyz") == 200, timeout=UP_WITHIN_S, message="green")
        assert scrape(port).value("buildq_database_up") == 1
        world.submit("fast", 2, prefix="after")
        wait_until(lambda: world.all_terminal(5), timeout=60, message="a build after recovery")
        assert d.stop() == 0
    finally:
        d.cleanup()
