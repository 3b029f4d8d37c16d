"""The daemon's configuration: ``buildq.toml`` plus ``BUILDQ_<TABLE>__<KEY>`` overrides.

Every table becomes a frozen dataclass, validated once at start-up; a bad value stops the
daemon with one line naming the TOML key. Runner tables are kept as ``Table`` here and
validated by their backend when the daemon wires them (still at start-up).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from buildq.buildrunner import registry
from buildq.config.base import ConfigError, Origin, Secret, Table, Unshown
from buildq.queue.settings import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_RETENTION_MS,
    Backoff,
    SubscriptionSettings,
)
from buildq.storage.columns import QUEUE_NAME_MAX

ENV_PREFIX = "BUILDQ_"
ENV_NESTING = "__"


@dataclass(frozen=True)
class DatabaseConfig:
    url: str  # without the password
    password: Secret | None = None
    pool_size: int = 10

    def connect_url(self) -> str:
        """The URL with the password filled in: for the engine only, never for display."""
        if self.password is None:
            return self.url
        parsed = sa.make_url(self.url).set(password=self.password.reveal())
        return parsed.render_as_string(hide_password=False)

    @classmethod
    def from_table(cls, table: Table, base_dir: Path) -> DatabaseConfig:
        url = table.str("url")
        try:
            parsed = sa.make_url(url)
        except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
            raise ConfigError(
                table.key("url"),
                Unshown("not shown: it may hold a password"),
                "a database URL: sqlite:///PATH or mysql+pymysql://USER@HOST[:PORT]/DB",
            ) from None
        if parsed.get_backend_name() not in ("sqlite", "mysql", "mariadb"):
            raise ConfigError(
                table.key("url"),
                parsed.render_as_string(hide_password=True),
                "sqlite:///PATH or mysql+pymysql://USER@HOST/DB",
            )
        if parsed.password:
            raise ConfigError(
                table.key("url"),
                parsed.render_as_string(hide_password=True),
                f"no password in the URL: set {table.key('password')} (mode-600 file), "
                f"{table.key('password_env')} or {table.key('password_file')}",
            )
        if (
            parsed.get_backend_name() == "sqlite"
            and parsed.database
            and not os.path.isabs(parsed.database)
        ):
            url = parsed.set(database=str(base_dir / parsed.database)).render_as_string()
        return cls(
            url=url,
            password=table.secret("password", required=False),
            pool_size=table.int("pool_size", 10, min=1, max=200),
        )


@dataclass(frozen=True)
class PollPolicy:
    """How often a build is polled, and how long it may take."""

    accepted_interval_s: float = 5.0
    running_interval_s: float = 10.0
    #: Each poll's interval is the last one times this, up to ``max_interval_s``.
    growth: float = 1.5
    max_interval_s: float = 60.0
    #: Each delay is moved by up to ± this fraction, so builds do not poll in lock-step.
    jitter: float = 0.1
    #: Cancel and fail (timeout) a build still ACCEPTED this long after trigger; 0 = never.
    start_by_s: float = 3600.0
    #: Cancel and fail (timeout) a build not finished this long after trigger; 0 = never.
    finish_by_s: float = 4 * 3600.0
    #: Interval of the safety poll when the runner's webhooks are on.
    webhook_safety_interval_s: float = 120.0

    @classmethod
    def from_table(cls, table: Table, defaults: PollPolicy | None = None) -> PollPolicy:
        base = defaults or cls()
        policy = cls(
            # 0: the next poll is due at once (for tests and benchmarks; a CI service would
            # rate-limit it).
            accepted_interval_s=table.float(
                "accepted_interval_s", base.accepted_interval_s, min=0.0
            ),
            running_interval_s=table.float("running_interval_s", base.running_interval_s, min=0.0),
            growth=table.float("growth", base.growth, min=1.0, max=10.0),
            max_interval_s=table.float("max_interval_s", base.max_interval_s, min=0.01),
            jitter=table.float("jitter", base.jitter, min=0.0, max=0.5),
            start_by_s=table.float("start_by_s", base.start_by_s, min=0.0),
            finish_by_s=table.float("finish_by_s", base.finish_by_s, min=0.0),
            webhook_safety_interval_s=table.float(
                "webhook_safety_interval_s", base.webhook_safety_interval_s, min=0.01
            ),
        )
        table.reject_unknown()
        return policy


@dataclass(frozen=True)
class BuildQueueConfig:
    """A named build queue: which runner builds it and how it is polled."""

    name: str
    runner: str
    poll: PollPolicy


@dataclass(frozen=True)
class ConsumerConfig:
    #: No longer used (runner calls run in per-runner lanes); read so older configs load.
    workers: int | None = None
    defaults: SubscriptionSettings = field(default_factory=SubscriptionSettings)
    topics: Mapping[str, SubscriptionSettings] = field(default_factory=dict)

    def for_topic(self, topic: str) -> SubscriptionSettings:
        return self.topics.get(topic, self.defaults)

    @classmethod
    def from_table(cls, table: Table) -> ConsumerConfig:
        defaults = _subscription(table.table("defaults"), SubscriptionSettings())
        topics_table = table.table("topics")
        topics = {
            name: _subscription(topics_table.table(name), defaults) for name in topics_table.data
        }
        workers = table.int("workers", min=1, max=256) if "workers" in table.data else None
        config = cls(workers=workers, defaults=defaults, topics=topics)
        table.reject_unknown()
        return config


def _subscription(table: Table, base: SubscriptionSettings) -> SubscriptionSettings:
    ints = {
        f.name: table.int(f.name, getattr(base, f.name), min=1)
        for f in fields(SubscriptionSettings)
        if f.name != "backoff"
    }
    backoff = Backoff(
        initial_ms=table.int("backoff_initial_ms", base.backoff.initial_ms, min=0),
        multiplier=table.float("backoff_multiplier", base.backoff.multiplier, min=1.0),
        cap_ms=table.int("backoff_cap_ms", base.backoff.cap_ms, min=0),
        jitter=table.float("backoff_jitter", base.backoff.jitter, min=0.0, max=1.0),
    )
    table.reject_unknown()
    try:
        return SubscriptionSettings(**ints, backoff=backoff)
    except ValueError as err:
        raise ConfigError(table.path, "(table)", str(err)) from None


@dataclass(frozen=True)
class HttpConfig:
    """The metrics and health endpoint."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = 9464
    #: How often the queue and build gauges are read from the database (one query each).
    metrics_refresh_s: float = 10.0

    @classmethod
    def from_table(cls, table: Table) -> HttpConfig:
        config = cls(
            enabled=table.bool("enabled", True),
            bind=table.str("bind", "127.0.0.1"),
            port=table.int("port", 9464, min=0, max=65535),
            metrics_refresh_s=table.float("metrics_refresh_s", 10.0, min=0.1, max=3600.0),
        )
        table.reject_unknown()
        return config


@dataclass(frozen=True)
class DaemonConfig:
    #: Longest a graceful stop waits for in-flight work before handing the rest back.
    shutdown_grace_s: float = 30.0
    log_level: str = "info"
    log_format: str = "auto"  # auto: console on a TTY, JSON lines otherwise
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    #: A message every consumer group is done with is deleted this long after it was written
    #: (it is also the deduplication record of its id until then); 0 keeps everything.
    retention_s: float = DEFAULT_RETENTION_MS / 1000

    @classmethod
    def from_table(cls, table: Table) -> DaemonConfig:
        config = cls(
            shutdown_grace_s=table.float("shutdown_grace_s", 30.0, min=0.0),
            log_level=table.choice("log_level", ("debug", "info", "warning", "error"), "info"),
            log_format=table.choice("log_format", ("auto", "json", "console"), "auto"),
            max_payload_bytes=table.int(
                "max_payload_bytes", DEFAULT_MAX_PAYLOAD_BYTES, min=1024, max=64 * 1024 * 1024
            ),
            retention_s=table.float("retention_s", cls.retention_s, min=0.0),
        )
        table.reject_unknown()
        return config


@dataclass(frozen=True)
class Config:
    path: Path | None
    database: DatabaseConfig
    daemon: DaemonConfig
    consumer: ConsumerConfig
    http: HttpConfig
    queues: Mapping[str, BuildQueueConfig]
    runners: Mapping[str, Table]
    webhooks: Table
    #: ``[web]``: read and validated by ``buildq web`` (buildq/web/config.py), not the daemon.
    web: Table = field(default_factory=lambda: Table("web", None))


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (may be None: defaults + environment), apply overrides, validate."""
    env = os.environ if environ is None else environ
    document: dict[str, Any] = {}
    file_path = Path(path).resolve() if path is not None else None
    if file_path is not None:
        document = _read_toml(file_path)
    env_keys = _apply_env_overrides(document, env)
    origin = Origin.of_file(file_path, env_keys) if file_path else Origin(env_keys=env_keys)
    # Relative SQLite paths are relative to the project/install root (the config dir's parent).
    base_dir = file_path.parent.parent if file_path is not None else Path.cwd()
    return _build(document, file_path, base_dir, origin)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError("--config", str(path), f"a readable TOML file ({err.strerror})") from None
    try:
        return tomllib.loads(text)
    except ValueError as err:  # TOMLDecodeError, or a number too long to convert
        raise ConfigError("--config", str(path), f"valid TOML ({str(err)[:200]})") from None


def _apply_env_overrides(document: dict[str, Any], env: Mapping[str, str]) -> frozenset[str]:
    applied = set()
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or ENV_NESTING not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split(ENV_NESTING)
        target = document
        for part in path[:-1]:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(name, raw, f"{part} to be a table")
            target = child
        target[path[-1]] = _env_value(raw)
        applied.add(".".join(path))
    return frozenset(applied)


def _env_value(raw: str) -> Any:
    """Numbers and booleans as TOML reads them; anything else as the string given."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except ValueError:  # TOMLDecodeError, or a number too long to convert
        return raw


def _build(document: dict[str, Any], path: Path | None, base_dir: Path, origin: Origin) -> Config:
    root = Table("", document, origin)
    database_table = root.table("database")
    database = DatabaseConfig.from_table(database_table, base_dir)
    database_table.reject_unknown()
    runners_table = root.table("runners")
    runners = {name: runners_table.table(name) for name in runners_table.data}
    for table in runners.values():
        registry.for_table(table)  # the type names a kind, and its plugin (if any) loads
    queues_table = root.table("queues")
    default_poll = PollPolicy.from_table(root.table("poll"))
    queues = {}
    for name in queues_table.data:
        table = queues_table.table(name)
        if len(name) > QUEUE_NAME_MAX:
            raise ConfigError(
                table.path,
                name[:40] + "...",
                f"a queue name of at most {QUEUE_NAME_MAX} characters",
            )
        runner = table.str("runner")
        if runner not in runners:
            raise ConfigError(table.key("runner"), runner, "the name of a [runners.NAME] table")
        queues[name] = BuildQueueConfig(
            name, runner, PollPolicy.from_table(table.table("poll"), default_poll)
        )
        table.reject_unknown()
    config = Config(
        path=path,
        database=database,
        daemon=DaemonConfig.from_table(root.table("daemon")),
        consumer=ConsumerConfig.from_table(root.table("consumer")),
        http=HttpConfig.from_table(root.table("http")),
        queues=queues,
        runners=runners,
        webhooks=root.table("webhooks"),
        web=root.table("web"),
    )
    root.reject_unknown()
    return config
