"""Primitives every config table is read with: typed readers, ConfigError, Secret.

A bad value stops start-up with one line naming the TOML path, the value and what was
expected. Secrets are never inline in config: a table names an environment variable
(``<name>_env``) or a file (``<name>_file``) and the value is wrapped in ``Secret`` so it cannot
leak through ``repr``, logs or ``--json`` output.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Table's reader methods are named after the types they return; these keep the builtins
# reachable inside the class body for annotations.
_str = str
_bool = bool
_int = int
_float = float

_MAX_SHOWN_VALUE = 80


class ConfigError(ValueError):
    """A config value is wrong. ``str()`` is the one line an operator sees."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"config {_show_key(key)} = {_show(value)}: expected {expected}")


class Unshown:
    """Stands for a value an error message leaves out because it may be a secret (a typo'd
    ``pasword``, a token pasted where its variable's name belongs, a URL with a password)."""

    def __init__(self, why: str = "not shown") -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"<{self.why}>"


#: What an environment variable's name looks like; anything else is not echoed in errors.
_ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def _show_key(key: str) -> str:
    # Keys come from the environment too (BUILDQ_…): one with a newline or a control
    # character must not break the one line an operator (or journald) reads.
    text = key if key.isprintable() else repr(key)[1:-1]
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 3] + "..."


def _show(value: object) -> str:
    if isinstance(value, Secret):
        return "<secret>"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 3] + "..."


@dataclass(frozen=True, slots=True)
class Secret:
    """A credential. Its value is only reachable through ``reveal()``."""

    _value: str
    source: str  # "env:NAME" or "file:/path": safe to show

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<redacted>, source={self.source!r})"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a table's values came from, which decides whether it may hold a secret inline."""

    file: Path | None = None
    #: The file is readable by its owner only (mode 600): like an ssh key, it may hold secrets.
    file_private: bool = False
    #: Dotted keys set from the environment (BUILDQ_...), which may always hold secrets.
    env_keys: frozenset[str] = frozenset()

    @classmethod
    def of_file(cls, file: Path, env_keys: frozenset[str] = frozenset()) -> Origin:
        mode = file.stat().st_mode
        return cls(file, not mode & (stat.S_IRWXG | stat.S_IRWXO), env_keys)


class Table:
    """A TOML table being read, remembering its dotted path for error messages."""

    def __init__(
        self, path: _str, data: Mapping[_str, Any] | None, origin: Origin | None = None
    ) -> None:
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(path, data, "a table")
        self.path = path
        self.data: Mapping[_str, Any] = data or {}
        self.origin = origin or Origin()
        self._read: set[_str] = set()

    def key(self, name: _str) -> _str:
        return f"{self.path}.{name}" if self.path else name

    def _get(self, name: _str, default: T) -> Any:
        self._read.add(name)
        return self.data.get(name, default)

    def str(self, name: _str, default: _str | None = None, *, allow_empty: _bool = False) -> _str:
        value = self._get(name, default)
        if value is None:
            raise ConfigError(self.key(name), None, "a string (this key is required)")
        if not isinstance(value, _str) or (not allow_empty and not value):
            raise ConfigError(self.key(name), value, "a non-empty string")
        return value

    def optional_str(self, name: _str) -> _str | None:
        value = self._get(name, None)
        if value is None:
            return None
        if not isinstance(value, _str) or not value:
            raise ConfigError(self.key(name), value, "a non-empty string")
        return value

    def int(
        self,
        name: _str,
        default: _int | None = None,
        *,
        min: _int | None = None,
        max: _int | None = None,
    ) -> _int:
        value = self._get(name, default)
        if value is None:
            raise ConfigError(self.key(name), None, "an integer (this key is required)")
        if isinstance(value, _bool) or not isinstance(value, _int):
            raise ConfigError(self.key(name), value, "an integer")
        _check_range(self.key(name), value, min, max)
        return value

    def float(
        self,
        name: _str,
        default: _float | None = None,
        *,
        min: _float | None = None,
        max: _float | None = None,
    ) -> _float:
        value = self._get(name, default)
        if value is None:
            raise ConfigError(self.key(name), None, "a number (this key is required)")
        if isinstance(value, _bool) or not isinstance(value, _int | _float):
            raise ConfigError(self.key(name), value, "a number")
        _check_range(self.key(name), _float(value), min, max)
        return _float(value)

    def bool(self, name: _str, default: _bool | None = None) -> _bool:
        value = self._get(name, default)
        if not isinstance(value, _bool):
            raise ConfigError(self.key(name), value, "true or false")
        return value

    def choice(self, name: _str, choices: tuple[_str, ...], default: _str | None = None) -> _str:
        value = self._get(name, default)
        if value not in choices:
            raise ConfigError(self.key(name), value, "one of " + ", ".join(choices))
        return _str(value)

    def table(self, name: _str) -> Table:
        self._read.add(name)
        return Table(self.key(name), self.data.get(name), self.origin)

    def str_list(self, name: _str, default: list[_str] | None = None) -> list[_str]:
        value = self._get(name, default if default is not None else [])
        if not isinstance(value, list) or not all(isinstance(v, _str) for v in value):
            raise ConfigError(self.key(name), value, "a list of strings")
        return list(value)

    def secret(self, name: _str, *, required: _bool = True) -> Secret | None:
        """Read ``<name>_env`` (an environment variable's name) or ``<name>_file`` (a path).

        An inline ``<name>`` is accepted only from the environment or from a config file that
        group and others cannot read; otherwise start-up stops and names the fix.
        """
        if name in self.data:
            return self._inline_secret(name)
        env_name = self.optional_str(name + "_env")
        file_name = self.optional_str(name + "_file")
        if env_name and file_name:
            raise ConfigError(
                self.key(name + "_env"), env_name, f"only one of {name}_env, {name}_file"
            )
        if env_name:
            value = os.environ.get(env_name)
            if not value:
                shown = (
                    env_name
                    if _ENV_NAME.fullmatch(env_name)
                    else Unshown("not shown: not a variable name, maybe the secret itself")
                )
                raise ConfigError(
                    self.key(name + "_env"),
                    shown,
                    "the name of a set, non-empty environment variable",
                )
            return Secret(value, f"env:{env_name}")
        if file_name:
            return Secret(
                read_secret_file(self.key(name + "_file"), Path(file_name)), f"file:{file_name}"
            )
        if required:
            raise ConfigError(self.key(name + "_env"), None, f"{name}_env or {name}_file to be set")
        return None

    def _inline_secret(self, name: _str) -> Secret:
        self._read.add(name)
        key = self.key(name)
        value = self.data[name]
        if not isinstance(value, _str) or not value:
            raise ConfigError(key, "<secret>", "a non-empty string")
        if key in self.origin.env_keys:
            return Secret(value, f"env:{key}")
        file = self.origin.file
        if file is not None and self.origin.file_private:
            return Secret(value, f"config:{key}")
        where = f"{file} holds a secret but group/others can read it: run 'chmod 600 {file}'"
        if file is None:
            where = "a secret from the environment or a file"
        raise ConfigError(
            key,
            "<secret>",
            f"{where}, or set {self.key(name + '_env')} / {self.key(name + '_file')} instead",
        )

    def reject_unknown(self) -> None:
        """Fail on keys nobody read: a typo must not silently fall back to a default."""
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            # The value is not shown: a misspelt secret key ("pasword") holds a secret.
            raise ConfigError(self.key(unknown[0]), Unshown(), "a known key (typo?)")


def _check_range(key: str, value: float, low: float | None, high: float | None) -> None:
    if low is not None and value < low:
        raise ConfigError(key, value, f"a value >= {low}")
    if high is not None and value > high:
        raise ConfigError(key, value, f"a value <= {high}")


def read_secret_file(key: str, path: Path) -> str:
    """Read a secret file, refusing one that group or others may read (as ssh does for keys)."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as err:
        raise ConfigError(key, str(path), f"a readable file ({err.strerror})") from None
    except ValueError as err:  # a NUL in the path, or a secret that is not UTF-8
        raise ConfigError(key, str(path), f"a readable text file ({err})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(key, str(path), f"a file only its owner can read: run 'chmod 600 {path}'")
    if not text:
        raise ConfigError(key, str(path), "a file holding the secret (it is empty)")
    return text
