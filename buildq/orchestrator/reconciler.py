"""The dead-letter reconcilers (``build_dlq``, ``buildsignal_dlq``): no build is left
non-terminal with nothing polling it."""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from buildq.buildrunner import BuildStatus, MalformedPayload
from buildq.orchestrator import topics
from buildq.orchestrator.buildstore import BuildReads, StepTx
from buildq.orchestrator.chain import (
    Runners,
    build_context,
    cancel_quietly,
    chain_poll_number,
    done,
    finish,
    request_context,
    result_message,
)
from buildq.orchestrator.model import BuildRequest, BuildState
from buildq.queue.contract import Delivery, Effect
from buildq.queue.worker import INLINE, Job

log = structlog.get_logger("buildq.orchestrator")


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
            return done(delivery)
        error = f"build request dead-lettered: {_letter_error(delivery)}"
        return Job(
            delivery,
            lambda: _fail_request(request, request_id, error),
            context=request_context(request_id),
        )

    def _poll_job(self, delivery: Delivery, build: BuildState | None) -> Job:
        build_id = delivery.message.partition_key
        if build is None or build.is_terminal:
            log.info("dead_letter_for_settled_build", build_id=build_id)
            return done(delivery)
        if chain_poll_number(delivery) != build.polls + 1:
            # Not the poll the build is due next: its chain is alive without this message.
            log.warning(
                "dead_letter_not_of_chain", build_id=build_id, message_id=delivery.message.id
            )
            return done(delivery)
        metadata = {**build.metadata, "failure_reason": "infra"}
        error = f"poll dead-lettered: {_letter_error(delivery)}"
        effect = finish(build, BuildStatus.FAILED, metadata, "infra", error, build.polls + 1)
        return self._cancel_then(delivery, build, effect)

    def _cancel_then(self, delivery: Delivery, build: BuildState, effect: Effect) -> Job:
        config = self.runners.queues.get(build.queue)
        runner = self.runners.runners.get(build.runner)
        if runner is None:
            return Job(delivery, lambda: effect, context=build_context(build))

        def run() -> Effect:
            log.warning("build_failed_infra", build_id=build.build_id, request_id=build.request_id)
            cancel_quietly(build, runner)
            return effect

        lane = config.runner if config else build.runner or INLINE
        return Job(delivery, run, lane=lane, context=build_context(build))


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
