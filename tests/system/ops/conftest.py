"""The database behind a proxy the test can cut: an outage without stopping the server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from tests.support.tcp_proxy import TcpProxy


@dataclass
class ProxiedDatabase:
    proxy: TcpProxy
    #: The test database's URL, through the proxy: what the daemon's config points at.
    url: str


@pytest.fixture
def proxied_database(backend_url: str) -> Iterator[ProxiedDatabase]:
    """The test's MariaDB behind a listening ``TcpProxy`` (``cut()`` plays an outage, ``listen()``
    ends it on the same port); cut after the test.

    Skipped on SQLite. Checked by hand: after the directory is moved or chmod-ed (and the tests
    run as root, whom chmod does not stop), the daemon's pooled connections keep using the open
    file, so reads and writes go on and there is no outage to report; only new connections
    would fail. SQLite has no server to stop.
    """
    url = sa.make_url(backend_url)
    if url.get_backend_name() == "sqlite":
        pytest.skip("SQLite has no server to lose: open connections keep working on the file")
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 3306))
    proxy.listen()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        yield ProxiedDatabase(proxy, proxied)
    finally:
        proxy.cut()
