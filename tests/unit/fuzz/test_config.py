"""The config loader, fed hostile files and environment overrides.

Start-up either gets a config it can run with or stops with one ``ConfigError`` line naming
the key: never a traceback, never a crash deeper in (wiring the runners and the webhook
receiver is part of start-up, so it is fuzzed too).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildq.config import ConfigError, load_config
from buildq.orchestrator.wiring import runners_from_config
from buildq.webhook import WebhookConfig
from tests.support.strategies import NASTY

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="buildq-fuzz-config-") as tmp:
        (Path(tmp) / "config").mkdir()
        yield Path(tmp)


def base(workdir: Path) -> dict[str, Any]:
    return {
        "database": {"url": f"sqlite:///{workdir / 'var' / 'buildq.db'}", "pool_size": 4},
        "daemon": {"shutdown_grace_s": 5, "log_level": "info", "log_format": "json"},
        "http": {"enabled": True, "bind": "127.0.0.1", "port": 0},
        "consumer": {"workers": 2, "defaults": {"slots": 8, "max_attempts": 3}},
        "runners": {
            "sim": {"type": "sim", "accepted_s": 0.1, "state_dir": str(workdir / "sim")},
            "noop": {"type": "noop"},
        },
        "poll": {"accepted_interval_s": 1.0, "jitter": 0.1},
        "queues": {
            "main": {"runner": "sim", "poll": {"finish_by_s": 60}},
            "fast": {"runner": "noop"},
        },
        "webhooks": {"enabled": False, "port": 0},
    }


#: Dotted paths of every key in the base document, plus some that do not exist.
def paths(doc: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out += paths(value, path + ".")
    return out


# Keys holding paths are left alone: a fuzzed state_dir would make directories anywhere.
PATH_KEYS = ("runners.sim.state_dir",)
KEYS = [p for p in paths(base(Path("/x"))) if p not in PATH_KEYS] + [
    "runners.sim.type",
    "runners.evil.type",
    "queues.main.runner",
    "queues.x.runner",
    "unknown",
    "database.password",
    "database.password_env",
    "database.password_file",
    "consumer.topics.build.max_attempts",
    "webhooks.enabled",
    "webhooks.bind",
]

toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([s for s in NASTY if "\ud800" not in s and "\udcff" not in s])
    | st.text(max_size=30)
    | st.sampled_from(["sim", "noop", "command", "buildkite", "github", "main", "x" * 10_000])
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def to_toml(doc: dict[str, Any], prefix: str = "") -> str:
    scalars = [
        f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)
    ]
    lines = ([f"[{prefix}]"] if prefix else []) + scalars
    for key, value in doc.items():
        if isinstance(value, dict):
            name = f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key)
            lines.append(to_toml(value, name))
    return "\n".join(lines) + "\n"


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    target = doc
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[last] = value


def start_up(path: Path, environ: dict[str, str] | None = None) -> None:
    """What ``buildq run`` does with a config before it touches the database."""
    try:
        config = load_config(path, environ or {})
        wired = runners_from_config(config.runners)
        wired.close()
        WebhookConfig.from_table(config.webhooks)
    except ConfigError as err:
        text = str(err)
        assert text.startswith("config ") and "\n" not in text, text
        assert len(text) < 1000, "a hostile value must not be echoed in full"


def test_an_environment_key_with_a_newline_is_shown_on_one_line(workdir: Path) -> None:
    # Found by the fuzzer above: the unknown key was echoed with its newline.
    path = workdir / "config" / "base.toml"
    path.write_text(to_toml(base(workdir)))
    path.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"BUILDQ__\n": "x"})
    assert "\n" not in str(caught.value) and "\\n" in str(caught.value), str(caught.value)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), toml_values), min_size=1, max_size=3))
def test_hostile_values_in_the_config_file(workdir: Path, changes: list[tuple[str, Any]]) -> None:
    doc = base(workdir)
    for key, value in changes:
        set_path(doc, key, value)
    path = workdir / "config" / "buildq.toml"
    path.write_text(to_toml(doc))
    path.chmod(0o600)
    start_up(path)


@pytest.mark.parametrize(
    "key", ["password_file", "password_env", "url", "pool_size"], ids=lambda k: f"database.{k}"
)
@pytest.mark.parametrize("value", ["a\x00b", "x" * 10_000_000, "", "'; DROP TABLE builds; --"])
def test_hostile_database_values(workdir: Path, key: str, value: str) -> None:
    doc = base(workdir)
    doc["database"][key] = value
    path = workdir / "config" / "db.toml"
    path.write_text(to_toml(doc))
    path.chmod(0o600)
    start_up(path)


@FUZZ
@given(
    st.text(max_size=400)
    | st.sampled_from(["[", "[[a]]\nb=1", "a = ", "x = '''", "\x00", "a = " + "1" * 5000])
)
def test_any_text_as_the_config_file(workdir: Path, text: str) -> None:
    path = workdir / "config" / "junk.toml"
    path.write_text(text, errors="surrogateescape")
    path.chmod(0o600)
    start_up(path)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(KEYS).map(lambda k: "BUILDQ_" + k.upper().replace(".", "__"))
        | st.text(max_size=20).map(lambda k: "BUILDQ_" + k),
        # What a real environment can hold: bytes without NUL, decoded as Python does.
        st.binary(max_size=40).map(lambda b: os.fsdecode(b.replace(b"\x00", b"")))
        | st.sampled_from([s for s in NASTY if "\x00" not in s and "\ud800" not in s]),
        max_size=3,
    )
)
def test_hostile_environment_overrides(workdir: Path, environ: dict[str, str]) -> None:
    path = workdir / "config" / "base.toml"
    path.write_text(to_toml(base(workdir)))
    path.chmod(0o600)
    start_up(path, environ)
