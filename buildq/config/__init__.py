"""Configuration: TOML tables read into frozen dataclasses, validated once at start-up."""

from buildq.config.base import ConfigError, Secret, Table, read_secret_file

__all__ = ["ConfigError", "Secret", "Table", "read_secret_file"]
