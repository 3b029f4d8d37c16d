"""Configuration: TOML tables read into frozen dataclasses, validated once at start-up."""

from buildq.config.base import ConfigError, Origin, Secret, Table, read_secret_file
from buildq.config.daemon import (
    BuildQueueConfig,
    Config,
    ConsumerConfig,
    DaemonConfig,
    DatabaseConfig,
    HttpConfig,
    PollPolicy,
    load_config,
)

__all__ = [
    "BuildQueueConfig",
    "Config",
    "ConfigError",
    "ConsumerConfig",
    "DaemonConfig",
    "DatabaseConfig",
    "HttpConfig",
    "Origin",
    "PollPolicy",
    "Secret",
    "Table",
    "load_config",
    "read_secret_file",
]
