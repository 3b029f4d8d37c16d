"""The fixtures every tier shares: a migrated database on each backend and the test's views of
it (a queue, subscriptions, the builds), the CLI run in this process, and what more than one
tier drives: the session's Buildbot master and the installed example runner plugin.

``backend_url`` is parametrised over SQLite (always) and MySQL/MariaDB (when
BUILDQ_TEST_MYSQL_URL is set; see tests/support/database.py for what CI=true changes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from buildq.buildrunner import registry
from buildq.buildrunner.buildbot import BuildbotRunner
from buildq.config.base import Table
from buildq.migrations import upgrade
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import SqlQueue, SqlSubscription
from buildq.storage.database import Database, create_engine
from tests.support import plugin_example
from tests.support.buildbot import BuildbotMaster, buildbot_venv
from tests.support.cli import CliResult, run_cli
from tests.support.daemon import World
from tests.support.database import (
    BACKENDS,
    FAST,
    clean_tables,
    private_database,
    require_mysql,
)


@pytest.fixture(scope="session")
def mysql_server_url() -> str:
    return require_mysql()


@pytest.fixture(scope="session")
def mysql_test_url(mysql_server_url: str) -> Iterator[str]:
    """A private, migrated database on the MySQL server for this test session."""
    with private_database(mysql_server_url, "buildq_test") as url:
        upgrade(url)
        yield url


@pytest.fixture
def mysql_url(mysql_test_url: str) -> str:
    """The session's MySQL database, emptied for this test."""
    clean_tables(mysql_test_url)
    return mysql_test_url


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database URL: a fresh SQLite file, or the session's MySQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'buildq.db'}"
        upgrade(url)
        return url
    url: str = request.getfixturevalue("mysql_url")
    return url


@pytest.fixture
def db(backend_url: str) -> Iterator[Database]:
    database = Database(create_engine(backend_url), retry_for_s=10)
    yield database
    database.dispose()


@pytest.fixture
def queue(db: Database) -> Iterator[SqlQueue]:
    q = SqlQueue(db)
    yield q
    q.close()


@pytest.fixture
def subscribe(queue: SqlQueue) -> Iterator[Callable[..., SqlSubscription]]:
    """``subscribe(topic, group="g", settings=FAST)``: closed at the end of the test."""
    opened: list[SqlSubscription] = []

    def _subscribe(
        topic: str, group: str = "g", settings: SubscriptionSettings = FAST, **kw: object
    ) -> SqlSubscription:
        sub = queue.subscribe(topic, group, settings, **kw)  # type: ignore[arg-type]
        opened.append(sub)
        return sub

    yield _subscribe
    for sub in opened:
        with contextlib.suppress(Exception):
            sub.close()


@pytest.fixture
def world(backend_url: str) -> Iterator[World]:
    """The test's view of the database a daemon (or the CLI) works on."""
    w = World(backend_url)
    yield w
    w.close()


@pytest.fixture
def cli(backend_url: str, capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``cli("builds", "show", X)``: ``buildq`` in this process with ``--url`` of the test's
    database appended; a traceback on stderr fails the test."""

    def run(*argv: str, url: bool = True) -> CliResult:
        result = run_cli([*argv, "--url", backend_url] if url else argv, capsys)
        assert "Traceback" not in result.err, result.err[-3000:]
        return result

    return run


@pytest.fixture(scope="session")
def buildbot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildbotMaster]:
    """A real Buildbot master and its workers, one for the whole session (slow to start)."""
    master = BuildbotMaster(buildbot_venv(), tmp_path_factory.mktemp("buildbot")).create()
    try:
        master.start()
        yield master
    finally:
        master.stop()


@pytest.fixture
def bb_runner(buildbot: BuildbotMaster) -> Iterator[BuildbotRunner]:
    """A Buildbot runner on the session's master, built as the daemon builds it."""
    table = Table("runners.bb", {"type": "buildbot", "api_url": buildbot.url, "builder": "buildq"})
    kind = registry.get("buildbot")
    runner = kind.factory("bb", kind.validate(table))
    assert isinstance(runner, BuildbotRunner)
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example runner plugin pip-installed into a directory of its own, to put on the path."""
    return plugin_example.install(tmp_path_factory.mktemp("plugin"))


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    """In-process CLI runs configure logging; every test starts from structlog's defaults."""
    import structlog

    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
