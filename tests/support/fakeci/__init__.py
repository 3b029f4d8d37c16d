"""Fake CI services over real HTTP on 127.0.0.1, for runner, webhook and end-to-end tests.

``FakeBuildkite`` and ``FakeGitHub`` keep builds/runs in memory, check the bearer token, send
the vendor's rate-limit headers, answer conditional GETs with 304 and misbehave on request
(``fail_next``, ``inject(Fault(...))``, ``rate.block``, ``rate.set``). Both record every
request they receive in ``requests``.
"""

from ._server import FakeService, Fault, Reply, Request
from .buildkite import FakeBuild, FakeBuildkite
from .github import FakeGitHub, FakeRun

__all__ = [
    "FakeBuild",
    "FakeBuildkite",
    "FakeGitHub",
    "FakeRun",
    "FakeService",
    "Fault",
    "Reply",
    "Request",
]
