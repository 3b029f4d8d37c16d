"""The ``sim`` runner: simulated builds for local runs, demos and load tests.

A simulated build waits in ACCEPTED, then RUNNING, for configurable times, then passes or
fails with a configured probability. Nothing runs. The whole plan (trigger time, time accepted,
time running, outcome) is drawn at ``trigger`` and written into the build id, so ``status`` is
pure arithmetic on the id and the clock: it costs nothing at 10,000+ builds and gives the same
answer after a restart or on another replica.

A trigger that carries the orchestrator's correlation key (``CORRELATION_KEY``, the request
id) is idempotent, as the HTTP runners make it by looking the build up on the CI service: a
second trigger of the same request (the daemon died or lost its claim between ``trigger`` and
recording the build) returns the build the first one planned instead of planning another.

The state is that correlation record and cancels. With ``state_dir`` each is a small file
there and survives restarts (and is seen by every replica sharing the directory); without it
both are kept in this process's memory only, and a restarted daemon forgets them.

For fault drills (chaos tests, alerting rehearsals), ``status_fault_file`` names a file whose
existence makes every ``status`` call fail with a transient error, as an unreachable CI
service would; delete the file and the builds are polled normally again. A slow CI service is
``status_delay_s`` (every ``status`` call takes that long) or ``status_hang_file`` (while it
exists, every ``status`` call waits: a CI service that stopped answering; delete it and the
waiting calls return).

Scripted by poll count: with ``polls = K`` a build answers RUNNING to its first K−1 ``status``
calls and its outcome to the K-th, whatever the clock says, so tests and benchmarks drive
exact poll chains. The count is kept in memory: a restarted daemon counts again from 0.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from buildq.buildrunner import registry
from buildq.buildrunner.contract import (
    CORRELATION_KEY,
    BuildID,
    BuildMetadata,
    BuildNotFound,
    BuildStatus,
    Change,
    TransientRunnerError,
)
from buildq.config.base import ConfigError, Table

_ID_PATTERN = re.compile(
    r"sim-([0-9]{1,16})-([0-9]{1,12})-([0-9]{1,12})-([pf])-([0-9a-f]{16})(?:-k([0-9]{1,9}))?"
)
#: How often a hung status call looks whether its hang file is gone.
_HANG_CHECK_S = 0.05
_CANCEL_SUFFIX = ".cancel"
_TRIGGER_SUFFIX = ".trigger"


@dataclass(frozen=True, slots=True)
class Span:
    """A duration in seconds: fixed when ``min_s == max_s``, else uniform in between."""

    min_s: float
    max_s: float

    def draw_ms(self, rng: random.Random) -> int:
        return round(rng.uniform(self.min_s, self.max_s) * 1000)


@dataclass(frozen=True, slots=True)
class SimProfile:
    """How long builds stay accepted and running, and how often they fail."""

    accepted: Span = Span(1.0, 1.0)
    running: Span = Span(5.0, 5.0)
    failure_probability: float = 0.1
    #: Scripted: RUNNING for polls − 1 status calls, then the outcome (None: by the clock).
    polls: int | None = None


@dataclass(frozen=True)
class SimConfig:
    """``[runners.<name>]`` with ``type = "sim"``; ``queues`` overrides ``default`` per queue."""

    default: SimProfile = SimProfile()
    queues: Mapping[str, SimProfile] = field(default_factory=dict)
    seed: int | None = None
    state_dir: Path | None = None
    status_fault_file: Path | None = None
    status_delay_s: float = 0.0
    status_hang_file: Path | None = None

    @property
    def blocks(self) -> bool:
        """Whether ``status`` may wait (then the daemon gives it a lane of threads)."""
        return self.status_delay_s > 0 or self.status_hang_file is not None

    @classmethod
    def from_table(cls, table: Table) -> SimConfig:
        default = _read_profile(table, SimProfile())
        queues_table = table.table("queues")
        queues = {
            name: _read_queue(queues_table.table(name), default) for name in queues_table.data
        }
        seed = table.int("seed") if "seed" in table.data else None
        state_dir = table.optional_str("state_dir")
        fault_file = table.optional_str("status_fault_file")
        delay_s = table.float("status_delay_s", 0.0, min=0.0, max=3600.0)
        hang_file = table.optional_str("status_hang_file")
        table.reject_unknown()
        return cls(
            default,
            queues,
            seed,
            Path(state_dir) if state_dir else None,
            Path(fault_file) if fault_file else None,
            delay_s,
            Path(hang_file) if hang_file else None,
        )

    def profile(self, queue: str) -> SimProfile:
        return self.queues.get(queue, self.default)


def _read_profile(table: Table, inherited: SimProfile) -> SimProfile:
    return SimProfile(
        accepted=_read_span(table, "accepted", inherited.accepted),
        running=_read_span(table, "running", inherited.running),
        failure_probability=table.float(
            "failure_probability", inherited.failure_probability, min=0.0, max=1.0
        ),
        polls=table.int("polls", inherited.polls, min=1, max=10**9)
        if "polls" in table.data
        else inherited.polls,
    )


def _read_queue(table: Table, inherited: SimProfile) -> SimProfile:
    profile = _read_profile(table, inherited)
    table.reject_unknown()
    return profile


def _read_span(table: Table, stem: str, inherited: Span) -> Span:
    """``<stem>_s`` alone is a fixed time; with ``<stem>_max_s`` it is a uniform range."""
    min_key, max_key = f"{stem}_s", f"{stem}_max_s"
    low = table.float(min_key, inherited.min_s, min=0.0)
    # Setting only the low end means "fixed": an inherited upper end would be a surprise.
    high_default = low if min_key in table.data else inherited.max_s
    high = table.float(max_key, high_default, min=0.0)
    if high < low:
        raise ConfigError(table.key(max_key), high, f"a value >= {min_key} ({low})")
    return Span(low, high)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the id says: a build's whole life, in epoch milliseconds."""

    triggered_ms: int
    accepted_ms: int
    running_ms: int
    passes: bool
    polls: int | None

    @property
    def started_ms(self) -> int:
        return self.triggered_ms + self.accepted_ms

    @property
    def finished_ms(self) -> int:
        return self.started_ms + self.running_ms

    @classmethod
    def parse(cls, build_id: BuildID) -> _Plan:
        match = _ID_PATTERN.fullmatch(build_id.id)
        if match is None:
            raise BuildNotFound(f"not a sim build id: {build_id.id!r}")
        t0, accepted, running, outcome, _, polls = match.groups()
        return cls(
            int(t0), int(accepted), int(running), outcome == "p", int(polls) if polls else None
        )


class SimRunner:
    """A BuildRunner that simulates builds; ``clock`` (epoch seconds) is injectable for tests."""

    def __init__(self, config: SimConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        # Seeded runs are reproducible in what they plan; the id's unique tail is not drawn
        # from this generator, so two runners with one seed still never share an id.
        self._rng = random.Random(config.seed)
        self._cancels: dict[str, int] = {}
        self._triggers: dict[str, str] = {}  # correlation key -> build id, without state_dir
        self._polled: dict[str, int] = {}  # scripted builds: status calls so far
        if config.state_dir is not None:
            config.state_dir.mkdir(parents=True, exist_ok=True)

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        key = (metadata or {}).get(CORRELATION_KEY)
        known = self._triggered(key) if key else None
        if known is not None:
            return BuildID(known)
        profile = self.config.profile(queue)
        with self._lock:
            accepted_ms = profile.accepted.draw_ms(self._rng)
            running_ms = profile.running.draw_ms(self._rng)
            passes = self._rng.random() >= profile.failure_probability
        outcome = "p" if passes else "f"
        build_id = (
            f"sim-{self._now_ms()}-{accepted_ms}-{running_ms}-{outcome}-{secrets.token_hex(8)}"
        )
        if profile.polls is not None:
            build_id += f"-k{profile.polls}"
        # Two triggers of one request racing (two replicas): the first record wins for both.
        return BuildID(self._remember(key, build_id) if key else build_id)

    def _triggered(self, key: str) -> str | None:
        if self.config.state_dir is None:
            with self._lock:
                return self._triggers.get(key)
        try:
            return self._trigger_file(key).read_text() or None
        except FileNotFoundError:
            return None

    def _remember(self, key: str, build_id: str) -> str:
        if self.config.state_dir is None:
            with self._lock:
                return self._triggers.setdefault(key, build_id)
        path = self._trigger_file(key)
        _write_once(path, build_id)
        return path.read_text()

    def _trigger_file(self, key: str) -> Path:
        assert self.config.state_dir is not None
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self.config.state_dir / (digest + _TRIGGER_SUFFIX)

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        plan = _Plan.parse(build_id)
        self._be_slow()
        fault = self.config.status_fault_file
        if fault is not None and fault.exists():
            raise TransientRunnerError(f"simulated status failure ({fault} exists)")
        cancelled_ms = self._cancelled_at(build_id)
        now_ms = self._now_ms() if cancelled_ms is None else cancelled_ms
        if plan.polls and cancelled_ms is None:
            # Scripted by poll count: the count decides, and the clock says nothing.
            state = self._scripted(build_id, plan)
            scripted: BuildMetadata = {"url": f"sim://{build_id.id}"}
            scripted["native_state"] = state.value.lower()
            if state is BuildStatus.FAILED:
                scripted["failure_reason"] = "verdict"
            return state, scripted
        state = _state_at(plan, now_ms)
        meta: BuildMetadata = {"url": f"sim://{build_id.id}"}
        if now_ms >= plan.started_ms:
            meta["started_at"] = _iso(plan.started_ms)
            meta["duration_s"] = _seconds(min(now_ms, plan.finished_ms) - plan.started_ms)
        if cancelled_ms is not None:
            meta.update(native_state="cancelled", failure_reason="cancelled")
            meta["finished_at"] = _iso(cancelled_ms)
            return BuildStatus.CANCELLED, meta
        meta["native_state"] = state.value.lower()
        if state.is_terminal:
            meta["finished_at"] = _iso(plan.finished_ms)
        if state is BuildStatus.FAILED:
            meta["failure_reason"] = "verdict"
        return state, meta

    def _be_slow(self) -> None:
        if self.config.status_delay_s:
            time.sleep(self.config.status_delay_s)
        hang = self.config.status_hang_file
        while hang is not None and hang.exists():
            time.sleep(_HANG_CHECK_S)

    def _scripted(self, build_id: BuildID, plan: _Plan) -> BuildStatus:
        assert plan.polls is not None
        with self._lock:
            calls = self._polled.get(build_id.id, 0) + 1
            if calls >= plan.polls:
                self._polled.pop(build_id.id, None)
            else:
                self._polled[build_id.id] = calls
        if calls < plan.polls:
            return BuildStatus.RUNNING
        return BuildStatus.SUCCEEDED if plan.passes else BuildStatus.FAILED

    def cancel(self, build_id: BuildID) -> None:
        plan = _Plan.parse(build_id)
        now_ms = self._now_ms()
        if not plan.polls and _state_at(plan, now_ms).is_terminal:
            return
        if self.config.state_dir is None:
            with self._lock:
                self._cancels.setdefault(build_id.id, now_ms)
            return
        _write_once(self.config.state_dir / (build_id.id + _CANCEL_SUFFIX), str(now_ms))

    def _cancelled_at(self, build_id: BuildID) -> int | None:
        if self.config.state_dir is None:
            with self._lock:
                return self._cancels.get(build_id.id)
        try:
            text = (self.config.state_dir / (build_id.id + _CANCEL_SUFFIX)).read_text()
        except FileNotFoundError:
            return None
        return int(text)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


def _state_at(plan: _Plan, now_ms: int) -> BuildStatus:
    if now_ms < plan.started_ms:
        return BuildStatus.ACCEPTED
    if now_ms < plan.finished_ms:
        return BuildStatus.RUNNING
    return BuildStatus.SUCCEEDED if plan.passes else BuildStatus.FAILED


def _write_once(path: Path, text: str) -> None:
    """Write ``path`` atomically unless it exists: the first cancel's time is the one kept."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    staging.write_text(text)
    try:
        os.link(staging, path)
    except FileExistsError:
        pass
    finally:
        staging.unlink()


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds")


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.3f}"


def _runner(_name: str, config: SimConfig) -> SimRunner:
    return SimRunner(config)


#: Its calls wait only when a profile delays them (``SimConfig.blocks``).
RUNNER_KIND = registry.RunnerKind(
    "sim", SimConfig.from_table, _runner, calls_wait=lambda config: bool(config.blocks)
)
