"""The controllers: build (trigger), buildsignal (the poll loop), and the DLQ reconcilers.

Each decides from a delivery and the runner what should happen, and returns an effect that
the framework commits together with the ack. They never touch the transport.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog
from structlog.contextvars import bind_contextvars

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
from buildq.orchestrator.framework import Effect, StepTx, Unprocessable
from buildq.orchestrator.model import Build, BuildRequest, result_payload
from buildq.orchestrator.store import BuildReads
from buildq.queue.contract import Delivery, Message, message_id

log = structlog.get_logger("buildq.orchestrator")

#: A poll message's id: ``<build id>/poll/<n>``; n counts polls of that build from 1.
POLL = "poll"


def poll_message(build_id: str, n: int) -> Message:
    return Message(
        id=message_id(build_id, POLL, n),
        payload=BuildID(build_id).to_bytes(),
        partition_key=build_id,
    )


def poll_number(delivery: Delivery, fallback: int) -> int:
    """The n of ``<build>/poll/<n>``; a hand-published nudge with another id continues the count."""
    prefix = message_id(delivery.message.partition_key, POLL) + "/"
    rest = delivery.message.id[len(prefix) :] if delivery.message.id.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else fallback + 1


def result_message(build: Build) -> Message:
    return Message(
        id=message_id(build.request_id, "result"),
        payload=result_payload(build),
        partition_key=build.request_id,
    )


@dataclass
class Runners:
    """Runners by name and queues by name, as wired from config."""

    runners: Mapping[str, BuildRunner]
    queues: Mapping[str, BuildQueueConfig]
    webhooks: frozenset[str] = frozenset()  # runner names whose webhooks are on
    now_ms: Callable[[], int] = field(default=lambda: 0)

    def for_queue(self, queue: str) -> tuple[BuildQueueConfig, BuildRunner]:
        config = self.queues.get(queue)
        if config is None:
            raise Unprocessable(f"unknown queue {queue!r}: not in [queues] of the config")
        return config, self.runners[config.runner]


class BuildController:
    """``build``: trigger the requested build once and start its poll loop."""

    topic = topics.BUILD
    #: The trigger is the one step that cannot safely run twice: renew the claim right before.
    renew_claim_first = True

    def __init__(self, runners: Runners, builds: BuildReads) -> None:
        self.runners = runners
        self.builds = builds

    def handle(self, delivery: Delivery) -> Effect | None:
        request = BuildRequest.from_bytes(delivery.message.payload)
        bind_contextvars(request_id=request.request_id, queue=request.queue)
        config, runner = self.runners.for_queue(request.queue)
        existing = self.builds.get_by_request(request.request_id)
        if existing is not None and existing.build_id is not None:
            # A replay: the build exists; make sure its loop started (a duplicate is a no-op).
            bind_contextvars(build_id=existing.build_id)
            log.info("build_request_replayed")
            return _start_loop(existing.build_id, config) if not existing.is_terminal else None
        if existing is not None:
            return None  # already failed before it could trigger
        metadata = {**request.metadata, CORRELATION_KEY: request.request_id}
        try:
            build_id = runner.trigger(request.queue, request.base, request.head, metadata)
        except RunnerError as err:
            if type(err) is RunnerError or isinstance(err, BuildNotFound):
                raise Unprocessable(f"runner refused the trigger: {err}") from err
            raise
        bind_contextvars(build_id=build_id.id)
        log.info("build_triggered", runner=config.runner)

        def effect(tx: StepTx) -> None:
            tx.builds.insert_triggered(request, build_id.id, config.runner)
            _start_loop(build_id.id, config)(tx)

        return effect


def _start_loop(build_id: str, config: BuildQueueConfig) -> Effect:
    def effect(tx: StepTx) -> None:
        tx.queue.publish_after(
            topics.BUILDSIGNAL, poll_message(build_id, 1), policy.first_poll_delay_ms(config.poll)
        )

    return effect


class BuildSignalController:
    """``buildsignal``: poll the runner; finish the build or schedule exactly one next poll."""

    topic = topics.BUILDSIGNAL

    def __init__(
        self, runners: Runners, builds: BuildReads, rng: random.Random | None = None
    ) -> None:
        self.runners = runners
        self.builds = builds
        self.rng = rng or random.Random()

    def handle(self, delivery: Delivery) -> Effect | None:
        build_id = BuildID.from_bytes(delivery.message.payload).id
        bind_contextvars(build_id=build_id)
        build = self.builds.get_by_build(build_id)
        if build is None:
            raise Unprocessable(f"unknown build {build_id!r}: no such build was stored")
        bind_contextvars(request_id=build.request_id, queue=build.queue)
        if build.is_terminal:
            log.info("poll_of_finished_build")
            return None  # a stale or hand-made poll: nothing changes
        config, runner = self.runners.for_queue(build.queue)
        n = poll_number(delivery, build.polls)
        missed = policy.deadline_passed(config.poll, build, self.runners.now_ms())
        if missed:
            return self._time_out(build, runner, missed)
        cancel_sent = False
        if build.cancel_requested_at_ms is not None and build.cancel_sent_at_ms is None:
            cancel_sent = self._send_cancel(build, runner)
        try:
            status, metadata = runner.status(BuildID(build_id))
        except BuildNotFound as err:
            return _finish(build, BuildStatus.FAILED, {"failure_reason": "lost"}, "lost", str(err))
        except RunnerUnauthorized:
            # The CI service refuses the token (the runner reports itself unhealthy): not the
            # build's fault, nor a poison message. Poll again on the growing cadence, without
            # spending retries, until the token works or the build's deadline passes.
            log.debug("build_poll_refused")
            status, metadata = build.build_status, dict(build.metadata)
        if status.is_terminal:
            reason = metadata.get("failure_reason") if status is not BuildStatus.SUCCEEDED else None
            if status is BuildStatus.CANCELLED:
                reason = reason or "cancelled"
            log.info("build_finished", status=status.value, polls=n)
            return _finish(build, status, metadata, reason, None)
        return self._schedule(build, config, status, metadata, n, cancel_sent)

    def _schedule(
        self,
        build: Build,
        config: BuildQueueConfig,
        status: BuildStatus,
        metadata: BuildMetadata,
        n: int,
        cancel_sent: bool,
    ) -> Effect:
        assert build.build_id is not None
        build_id = build.build_id
        webhooks = config.runner in self.runners.webhooks
        delay = policy.next_poll_delay_ms(config.poll, status, n, webhooks=webhooks, rng=self.rng)
        until = policy.until_next_deadline_ms(config.poll, build, status, self.runners.now_ms())
        if until is not None:
            delay = min(delay, until)
        if status is BuildStatus.UNKNOWN:
            log.warning("build_status_unknown", native_state=metadata.get("native_state", ""))

        def effect(tx: StepTx) -> None:
            if cancel_sent:
                tx.builds.mark_cancel_sent(build_id)
            tx.builds.record_poll(build_id, status, metadata, n, delay)
            tx.queue.publish_after(topics.BUILDSIGNAL, poll_message(build_id, n + 1), delay)

        return effect

    def _time_out(self, build: Build, runner: BuildRunner, missed: str) -> Effect:
        assert build.build_id is not None
        log.warning("build_deadline_passed", deadline=missed)
        try:
            runner.cancel(BuildID(build.build_id))
        except RunnerError as err:  # record the timeout anyway; the runner may be gone
            log.warning("cancel_failed", error=str(err)[:300])
        metadata = {**build.metadata, "failure_reason": "timeout"}
        return _finish(build, BuildStatus.FAILED, metadata, "timeout", missed)

    def _send_cancel(self, build: Build, runner: BuildRunner) -> bool:
        assert build.build_id is not None
        try:
            runner.cancel(BuildID(build.build_id))
        except RunnerError as err:  # asked again on the next poll
            log.warning("cancel_failed", error=str(err)[:300])
            return False
        log.info("cancel_sent")
        return True


def _finish(
    build: Build,
    status: BuildStatus,
    metadata: Mapping[str, str],
    reason: str | None,
    error: str | None,
) -> Effect:
    assert build.build_id is not None
    build_id = build.build_id

    def effect(tx: StepTx) -> None:
        finished = tx.builds.finish(build_id, status, metadata, reason, error)
        if finished is not None:  # write-once: only the first finisher publishes the result
            tx.queue.publish(topics.BUILDRESULT, result_message(finished))

    return effect


class DeadLetterReconciler:
    """``build_dlq`` / ``buildsignal_dlq``: no build is left non-terminal with nothing polling it."""

    #: It retries (with backoff) instead of dead-lettering a dead letter.
    never_dead_letter = True

    def __init__(self, topic: str, runners: Runners) -> None:
        self.topic = topic
        self.runners = runners

    def handle(self, delivery: Delivery) -> Effect | None:
        dead = delivery.dead_letter
        error = dead.last_error if dead else "dead-lettered"
        request: BuildRequest | None = None
        if self.topic == topics.BUILD_DLQ:
            try:
                request = BuildRequest.from_bytes(delivery.message.payload)
            except MalformedPayload:
                request = None
            request_id = request.request_id if request else delivery.message.partition_key
            bind_contextvars(request_id=request_id)
            return self._fail_request(request, request_id, error)
        build_id = delivery.message.partition_key
        bind_contextvars(build_id=build_id)
        return self._fail_build(build_id, error)

    def _fail_request(self, request: BuildRequest | None, request_id: str, error: str) -> Effect:
        def effect(tx: StepTx) -> None:
            failed = tx.builds.fail_request(
                request, request_id, f"build request dead-lettered: {error}"
            )
            if failed is not None:
                log.warning("build_failed_infra", request_id=request_id)
                tx.queue.publish(topics.BUILDRESULT, result_message(failed))

        return effect

    def _fail_build(self, build_id: str, error: str) -> Effect:
        def effect(tx: StepTx) -> None:
            build = tx.builds.get_by_build(build_id)
            if build is None:
                log.warning("dead_letter_for_unknown_build")
                return
            bind_contextvars(request_id=build.request_id, queue=build.queue)
            metadata = {**build.metadata, "failure_reason": "infra"}
            finished = tx.builds.finish(
                build_id, BuildStatus.FAILED, metadata, "infra", f"poll dead-lettered: {error}"
            )
            if finished is not None:
                log.warning("build_failed_infra")
                tx.queue.publish(topics.BUILDRESULT, result_message(finished))

        return effect
