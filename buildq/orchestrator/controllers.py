"""The handlers of the daemon's topics: build (trigger), buildsignal (the poll loop) and the
dead-letter reconcilers.

Each plans a claimed batch: one read of the builds the batch needs, then a job per delivery.
A job that waits on a CI service (trigger, status, cancel) runs in its runner's lane, so a slow
CI service holds only its own builds; a job that only decides from what was read runs inline.
A job returns an effect that the worker commits together with the ack; handlers never touch
the transport.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from buildq.buildrunner import (
    CORRELATION_KEY,
    BuildID,
    BuildMetadata,
    BuildNotFound,
    BuildRunner,
    BuildStatus,
    MalformedPayload,
    RunnerError,
    RunnerUnauthorized,
)
from buildq.config import BuildQueueConfig
from buildq.orchestrator import policy, topics
from buildq.orchestrator.buildstore import BuildReads, StepTx
from buildq.orchestrator.model import BuildRequest, BuildState, FinishedBuild, result_payload
from buildq.queue.contract import Delivery, Effect, Message, message_id
from buildq.queue.worker import INLINE, Job, Unprocessable

log = structlog.get_logger("buildq.orchestrator")

#: A poll message's id: ``<build id>/poll/<n>``; n counts polls of that build from 1.
POLL = "poll"


def poll_message(build_id: str, n: int) -> Message:
    return Message(
        id=message_id(build_id, POLL, n),
        payload=BuildID(build_id).to_bytes(),
        partition_key=build_id,
    )


def chain_poll_number(delivery: Delivery) -> int | None:
    """The n of a ``<build>/poll/<n>`` message of the build it is keyed on; None otherwise."""
    prefix = message_id(delivery.message.partition_key, POLL) + "/"
    rest = delivery.message.id[len(prefix) :] if delivery.message.id.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


def poll_number(delivery: Delivery, polls: int) -> int:
    """The n of ``<build>/poll/<n>``; a hand-published nudge with another id is the next poll
    of a build polled ``polls`` times."""
    n = chain_poll_number(delivery)
    return polls + 1 if n is None else n


def result_message(build: FinishedBuild) -> Message:
    return Message(
        id=message_id(build.request_id, "result"),
        payload=result_payload(build),
        partition_key=build.request_id,
    )


@dataclass
class Runners:
    """Runners by name and queues by name, as wired from config. A runner's name is also the
    name of its lane (``buildq.queue.worker``)."""

    runners: Mapping[str, BuildRunner]
    queues: Mapping[str, BuildQueueConfig]
    webhooks: frozenset[str] = frozenset()  # runner names whose webhooks are on
    now_ms: Callable[[], int] = field(default=lambda: 0)

    def for_queue(self, queue: str) -> tuple[BuildQueueConfig, BuildRunner]:
        config = self.queues.get(queue)
        if config is None:
            raise Unprocessable(f"unknown queue {queue!r}: not in [queues] of the config")
        return config, self.runners[config.runner]


def _fails(delivery: Delivery, err: Exception, key: str) -> Job:
    def run() -> Effect | None:
        raise err

    return Job(delivery, run, context={key: delivery.message.partition_key})


def _done(delivery: Delivery) -> Job:
    """Nothing to do but ack."""
    return Job(delivery, lambda: None)


def _request(request_id: str) -> dict[str, str]:
    return {"request_id": request_id}


def _build(build: BuildState) -> dict[str, str]:
    return {"build_id": build.build_id, "request_id": build.request_id}


class BuildController:
    """``build``: trigger the requested build once and start its poll loop."""

    topic = topics.BUILD
    #: The trigger is the one step that cannot safely run twice: confirm the claim first.
    renew_claim_first = True
    never_dead_letter = False

    def __init__(self, runners: Runners, builds: BuildReads) -> None:
        self.runners = runners
        self.builds = builds

    def plan(self, deliveries: Sequence[Delivery]) -> list[Job]:
        requests: list[BuildRequest | MalformedPayload] = []
        for delivery in deliveries:
            try:
                requests.append(BuildRequest.from_bytes(delivery.message.payload))
            except MalformedPayload as err:
                requests.append(err)
        stored = self.builds.states_by_request(
            [r.request_id for r in requests if isinstance(r, BuildRequest)]
        )
        return [
            _fails(d, r, "request_id")
            if isinstance(r, MalformedPayload)
            else self._job(d, r, stored)
            for d, r in zip(deliveries, requests, strict=True)
        ]

    def _job(
        self, delivery: Delivery, request: BuildRequest, stored: Mapping[str, BuildState]
    ) -> Job:
        try:
            config, runner = self.runners.for_queue(request.queue)
        except Unprocessable as err:
            return _fails(delivery, err, "request_id")
        existing = stored.get(request.request_id)
        context = _request(request.request_id)
        if existing is not None:
            return Job(delivery, functools.partial(_replayed, existing, config), context=context)
        trigger = functools.partial(self._trigger, request, config, runner)
        return Job(delivery, trigger, lane=config.runner, context=context)

    def _trigger(
        self, request: BuildRequest, config: BuildQueueConfig, runner: BuildRunner
    ) -> Effect:
        metadata = {**request.metadata, CORRELATION_KEY: request.request_id}
        try:
            build_id = runner.trigger(request.queue, request.base, request.head, metadata)
        except RunnerError as err:
            if type(err) is RunnerError or isinstance(err, BuildNotFound):
                raise Unprocessable(f"runner refused the trigger: {err}") from err
            raise
        log.info(
            "build_triggered",
            request_id=request.request_id,
            build_id=build_id.id,
            queue=request.queue,
            runner=config.runner,
        )

        def effect(tx: StepTx) -> None:
            tx.builds.insert_triggered(request, build_id.id, config.runner)
            _start_loop(build_id.id, config, 1)(tx)

        return effect


def _replayed(existing: BuildState, config: BuildQueueConfig) -> Effect | None:
    """A request seen again: the build exists. Its loop goes on through the next poll it is
    due, whose id collides with the live poll message, so a replay never starts a second chain
    (not even once retention has purged the build's first poll)."""
    if not existing.build_id or existing.is_terminal:
        return None  # failed before it could trigger, or finished
    log.info("build_request_replayed", request_id=existing.request_id, build_id=existing.build_id)
    return _start_loop(existing.build_id, config, existing.polls + 1)


def _start_loop(build_id: str, config: BuildQueueConfig, n: int) -> Effect:
    def effect(tx: StepTx) -> None:
        delay = policy.first_poll_delay_ms(config.poll)
        tx.queue.publish_after(topics.BUILDSIGNAL, poll_message(build_id, n), delay)

    return effect


class BuildSignalController:
    """``buildsignal``: poll the runner; finish the build or schedule exactly one next poll."""

    topic = topics.BUILDSIGNAL
    renew_claim_first = False
    never_dead_letter = False

    def __init__(
        self, runners: Runners, builds: BuildReads, rng: random.Random | None = None
    ) -> None:
        self.runners = runners
        self.builds = builds
        self.rng = rng or random.Random()

    def plan(self, deliveries: Sequence[Delivery]) -> list[Job]:
        ids: list[str | MalformedPayload] = []
        for delivery in deliveries:
            try:
                ids.append(BuildID.from_bytes(delivery.message.payload).id)
            except MalformedPayload as err:
                ids.append(err)
        states = self.builds.states_by_build([i for i in ids if isinstance(i, str)])
        now_ms = self.runners.now_ms()
        return [
            _fails(d, i, "build_id")
            if isinstance(i, MalformedPayload)
            else self._job(d, i, states, now_ms)
            for d, i in zip(deliveries, ids, strict=True)
        ]

    def _job(
        self, delivery: Delivery, build_id: str, states: Mapping[str, BuildState], now_ms: int
    ) -> Job:
        build = states.get(build_id)
        if build is None:
            unknown = Unprocessable(f"unknown build {build_id!r}: no such build was stored")
            return _fails(delivery, unknown, "build_id")
        n = poll_number(delivery, build.polls)
        if build.is_terminal or n <= build.polls:
            # A stale or hand-made poll: the build is finished, or this poll number was done
            # (a nudge took the count on). Nothing changes, nothing is scheduled.
            log.debug("poll_stale", build_id=build_id, n=n, polls=build.polls)
            return _done(delivery)
        try:
            config, runner = self.runners.for_queue(build.queue)
        except Unprocessable as err:
            return _fails(delivery, err, "build_id")
        missed = policy.deadline_passed(config.poll, build.created_at_ms, build.status, now_ms)
        if missed:
            run = functools.partial(self._time_out, build, runner, missed, n)
        else:
            run = functools.partial(self._poll, build, config, runner, n)
        return Job(delivery, run, lane=config.runner, context=_build(build))

    def _poll(
        self, build: BuildState, config: BuildQueueConfig, runner: BuildRunner, n: int
    ) -> Effect:
        cancel_sent = False
        if build.cancel_requested_at_ms is not None and build.cancel_sent_at_ms is None:
            cancel_sent = _send_cancel(build, runner)
        try:
            status, metadata = runner.status(BuildID(build.build_id))
        except BuildNotFound as err:
            return _finish(
                build, BuildStatus.FAILED, {"failure_reason": "lost"}, "lost", str(err), n
            )
        except RunnerUnauthorized:
            # The CI service refuses the token (the runner reports itself unhealthy): not the
            # build's fault, nor a poison message. Poll again on the growing cadence, without
            # spending retries, until the token works or the build's deadline passes.
            log.debug("build_poll_refused", build_id=build.build_id)
            status, metadata = build.status, dict(build.metadata)
        if status.is_terminal:
            reason = metadata.get("failure_reason") if status is not BuildStatus.SUCCEEDED else None
            if status is BuildStatus.CANCELLED:
                reason = reason or "cancelled"
            log.info("build_finished", build_id=build.build_id, status=status.value, polls=n)
            return _finish(build, status, metadata, reason, None, n)
        return self._schedule(build, config, status, metadata, n, cancel_sent)

    def _schedule(
        self,
        build: BuildState,
        config: BuildQueueConfig,
        status: BuildStatus,
        metadata: BuildMetadata,
        n: int,
        cancel_sent: bool,
    ) -> Effect:
        build_id = build.build_id
        webhooks = config.runner in self.runners.webhooks
        delay = policy.next_poll_delay_ms(config.poll, status, n, webhooks=webhooks, rng=self.rng)
        until = policy.until_next_deadline_ms(
            config.poll, build.created_at_ms, status, self.runners.now_ms()
        )
        if until is not None:
            delay = min(delay, until)
        if status is BuildStatus.UNKNOWN:
            log.warning(
                "build_status_unknown",
                build_id=build_id,
                native_state=metadata.get("native_state", ""),
            )

        def effect(tx: StepTx) -> None:
            if cancel_sent:
                tx.builds.mark_cancel_sent(build_id)
            tx.builds.record_poll(build_id, status, metadata, n, delay)
            tx.queue.publish_after(topics.BUILDSIGNAL, poll_message(build_id, n + 1), delay)

        return effect

    def _time_out(self, build: BuildState, runner: BuildRunner, missed: str, n: int) -> Effect:
        log.warning("build_deadline_passed", build_id=build.build_id, deadline=missed)
        _cancel_quietly(build, runner)
        metadata = {**build.metadata, "failure_reason": "timeout"}
        return _finish(build, BuildStatus.FAILED, metadata, "timeout", missed, n)


def _send_cancel(build: BuildState, runner: BuildRunner) -> bool:
    try:
        runner.cancel(BuildID(build.build_id))
    except RunnerError as err:  # asked again on the next poll
        log.warning("cancel_failed", build_id=build.build_id, error=str(err)[:300])
        return False
    log.info("cancel_sent", build_id=build.build_id)
    return True


def _cancel_quietly(build: BuildState, runner: BuildRunner) -> None:
    """Cancel on the CI before recording a result we decided on: the build may be running."""
    try:
        runner.cancel(BuildID(build.build_id))
    except RunnerError as err:  # record the result anyway; the runner may be gone
        log.warning("cancel_failed", build_id=build.build_id, error=str(err)[:300])


def _finish(
    build: BuildState,
    status: BuildStatus,
    metadata: Mapping[str, str],
    reason: str | None,
    error: str | None,
    polls: int,
) -> Effect:
    def effect(tx: StepTx) -> None:
        finished = tx.builds.finish(build, status, metadata, reason, error, polls)
        if finished is not None:  # write-once: only the first finisher publishes the result
            tx.queue.publish(topics.BUILDRESULT, result_message(finished))

    return effect


class DeadLetterReconciler:
    """``build_dlq`` / ``buildsignal_dlq``: no build is left non-terminal with nothing polling it.

    It acts only on a letter of the build's own chain: the poll the build is due next, or a
    request that was never recorded. A stray message that shares the key (a typo'd ``buildq
    queue publish``) is not the build's, and the build goes on. A result it publishes for a
    build that was triggered cancels the CI build first."""

    renew_claim_first = False
    #: It retries (with backoff) instead of dead-lettering a dead letter.
    never_dead_letter = True

    def __init__(self, topic: str, runners: Runners, builds: BuildReads) -> None:
        self.topic = topic
        self.runners = runners
        self.builds = builds

    def plan(self, deliveries: Sequence[Delivery]) -> list[Job]:
        if self.topic == topics.BUILD_DLQ:
            requests = [_request_of(d) for d in deliveries]
            states = self.builds.states_by_request([request_id for _, request_id in requests])
            return [
                self._request_job(d, request, request_id, states.get(request_id))
                for d, (request, request_id) in zip(deliveries, requests, strict=True)
            ]
        states = self.builds.states_by_build([d.message.partition_key for d in deliveries])
        return [self._poll_job(d, states.get(d.message.partition_key)) for d in deliveries]

    def _request_job(
        self,
        delivery: Delivery,
        request: BuildRequest | None,
        request_id: str,
        existing: BuildState | None,
    ) -> Job:
        if existing is not None:
            # The request is recorded (its build runs, or it failed already): what happens to
            # the build is its poll chain's to say, not a request letter's.
            log.warning("dead_letter_for_recorded_request", request_id=request_id)
            return _done(delivery)
        error = f"build request dead-lettered: {_letter_error(delivery)}"
        return Job(
            delivery,
            lambda: _fail_request(request, request_id, error),
            context=_request(request_id),
        )

    def _poll_job(self, delivery: Delivery, build: BuildState | None) -> Job:
        build_id = delivery.message.partition_key
        if build is None or build.is_terminal:
            log.info("dead_letter_for_settled_build", build_id=build_id)
            return _done(delivery)
        if chain_poll_number(delivery) != build.polls + 1:
            # Not the poll the build is due next: its chain is alive without this message.
            log.warning(
                "dead_letter_not_of_chain", build_id=build_id, message_id=delivery.message.id
            )
            return _done(delivery)
        metadata = {**build.metadata, "failure_reason": "infra"}
        error = f"poll dead-lettered: {_letter_error(delivery)}"
        effect = _finish(build, BuildStatus.FAILED, metadata, "infra", error, build.polls + 1)
        return self._cancel_then(delivery, build, effect)

    def _cancel_then(self, delivery: Delivery, build: BuildState, effect: Effect) -> Job:
        config = self.runners.queues.get(build.queue)
        runner = self.runners.runners.get(build.runner)
        if runner is None:
            return Job(delivery, lambda: effect, context=_build(build))

        def run() -> Effect:
            log.warning("build_failed_infra", build_id=build.build_id, request_id=build.request_id)
            _cancel_quietly(build, runner)
            return effect

        lane = config.runner if config else build.runner or INLINE
        return Job(delivery, run, lane=lane, context=_build(build))


def _request_of(delivery: Delivery) -> tuple[BuildRequest | None, str]:
    """The request a dead request letter holds (None if unreadable), and its id (else the
    letter's key)."""
    try:
        request = BuildRequest.from_bytes(delivery.message.payload)
    except MalformedPayload:
        return None, delivery.message.partition_key
    return request, request.request_id


def _letter_error(delivery: Delivery) -> str:
    dead = delivery.dead_letter
    return dead.last_error if dead else "dead-lettered"


def _fail_request(request: BuildRequest | None, request_id: str, error: str) -> Effect:
    def effect(tx: StepTx) -> None:
        failed = tx.builds.fail_request(request, request_id, error)
        if failed is not None:
            log.warning("build_failed_infra", request_id=request_id)
            tx.queue.publish(topics.BUILDRESULT, result_message(failed))

    return effect
