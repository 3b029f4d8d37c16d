"""HttpRunner's one constructor: the name it defaults to, the rate signal it hands the
transport, and ``_setup`` running once the config and the transport are in place."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from buildq.buildrunner import _ratelimit
from buildq.buildrunner._http_runner import HttpRunner
from buildq.buildrunner._http_transport import HttpSettings
from buildq.config.base import Secret


@dataclass(frozen=True)
class _Config:
    http: HttpSettings
    project: str


class _Runner(HttpRunner[_Config]):
    kind = "example"
    vendor = "Example"

    def _setup(self) -> None:
        self.seen = (self.name, self.config.project, self._core.vendor)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        yield client


def _config() -> _Config:
    return _Config(HttpSettings("http://127.0.0.1:9", Secret("", "none")), "app")


def test_the_name_defaults_to_the_kind(client: httpx.Client) -> None:
    assert _Runner(_config(), client).name == "example"
    assert _Runner(_config(), client, name="ci").name == "ci"


def test_setup_sees_the_config_and_the_transport(client: httpx.Client) -> None:
    assert _Runner(_config(), client, name="ci").seen == ("ci", "app", "Example")


def test_the_default_rate_signal_reads_retry_after(client: httpx.Client) -> None:
    runner = _Runner(_config(), client)
    assert runner._core._rate_signal is _ratelimit.retry_after_signal


@pytest.mark.parametrize(
    ("kind", "own_rate_signal"),
    [
        ("buildkite", True),
        ("github", True),
        ("gitlab", True),
        ("jenkins", False),
        ("buildbot", False),
    ],
)
def test_each_http_runner_names_its_kind_and_rate_signal(kind: str, own_rate_signal: bool) -> None:
    module = importlib.import_module(f"buildq.buildrunner.{kind}")
    (runner_class,) = (
        value
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, HttpRunner) and value is not HttpRunner
    )
    assert runner_class.kind == module.RUNNER_KIND.name == kind
    expected = module.rate_signal if own_rate_signal else _ratelimit.retry_after_signal
    assert runner_class.rate_signal is expected
