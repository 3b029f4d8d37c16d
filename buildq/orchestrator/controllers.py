"""The handlers of the daemon's topics: build (trigger) and buildsignal (the poll loop); the
dead-letter reconcilers are in ``reconciler``, what they all share in ``chain``.

Each plans a claimed batch: one read of the builds the batch needs, then a job per delivery.
A job that waits on a CI service (trigger, status, cancel) runs in its runner's lane, so a slow
CI service holds only its own builds; a job that only decides from what was read runs inline.
A job returns an effect that the worker commits together with the ack; handlers never touch
the transport.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping, Sequence

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
from buildq.orchestrator.chain import (
    Runners,
    build_context,
    cancel_quietly,
    done,
    fails,
    finish,
    poll_message,
    poll_number,
    request_context,
)
from buildq.orchestrator.model import BuildRequest, BuildState
from buildq.queue.contract import Delivery, Effect
from buildq.queue.worker import Job, Unprocessable

log = structlog.get_logger("buildq.orchestrator")


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
            fails(d, r, "request_id")
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
            return fails(delivery, err, "request_id")
        existing = stored.get(request.request_id)
        context = request_context(request.request_id)
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
            fails(d, i, "build_id")
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
            return fails(delivery, unknown, "build_id")
        n = poll_number(delivery, build.polls)
        if build.is_terminal or n <= build.polls:
            # A stale or hand-made poll: the build is finished, or this poll number was done
            # (a nudge took the count on). Nothing changes, nothing is scheduled.
            log.debug("poll_stale", build_id=build_id, n=n, polls=build.polls)
            return done(delivery)
        try:
            config, runner = self.runners.for_queue(build.queue)
        except Unprocessable as err:
            return fails(delivery, err, "build_id")
        missed = policy.deadline_passed(config.poll, build.created_at_ms, build.status, now_ms)
        if missed:
            run = functools.partial(self._time_out, build, runner, missed, n)
        else:
            run = functools.partial(self._poll, build, config, runner, n)
        return Job(delivery, run, lane=config.runner, context=build_context(build))

    def _poll(
        self, build: BuildState, config: BuildQueueConfig, runner: BuildRunner, n: int
    ) -> Effect:
        cancel_sent = False
        if build.cancel_requested_at_ms is not None and build.cancel_sent_at_ms is None:
            cancel_sent = _send_cancel(build, runner)
        try:
            status, metadata = runner.status(BuildID(build.build_id))
        except BuildNotFound as err:
            return finish(
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
            return finish(build, status, metadata, reason, None, n)
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
        cancel_quietly(build, runner)
        metadata = {**build.metadata, "failure_reason": "timeout"}
        return finish(build, BuildStatus.FAILED, metadata, "timeout", missed, n)


def _send_cancel(build: BuildState, runner: BuildRunner) -> bool:
    try:
        runner.cancel(BuildID(build.build_id))
    except RunnerError as err:  # asked again on the next poll
        log.warning("cancel_failed", build_id=build.build_id, error=str(err)[:300])
        return False
    log.info("cancel_sent", build_id=build.build_id)
    return True
