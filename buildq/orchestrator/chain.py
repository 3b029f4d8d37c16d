"""What the build handlers share: a build's chain of messages (its polls ``<build>/poll/<n>``
and its result), the effects that end it, the jobs that fail or only ack, and the runners they
call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from buildq.buildrunner import BuildID, BuildRunner, BuildStatus, RunnerError
from buildq.config import BuildQueueConfig
from buildq.orchestrator import topics
from buildq.orchestrator.buildstore import StepTx
from buildq.orchestrator.model import BuildState, FinishedBuild, result_payload
from buildq.queue.contract import Delivery, Effect, Message, message_id
from buildq.queue.worker import Job, Unprocessable

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


def fails(delivery: Delivery, err: Exception, key: str) -> Job:
    def run() -> Effect | None:
        raise err

    return Job(delivery, run, context={key: delivery.message.partition_key})


def done(delivery: Delivery) -> Job:
    """Nothing to do but ack."""
    return Job(delivery, lambda: None)


def request_context(request_id: str) -> dict[str, str]:
    return {"request_id": request_id}


def build_context(build: BuildState) -> dict[str, str]:
    return {"build_id": build.build_id, "request_id": build.request_id}


def cancel_quietly(build: BuildState, runner: BuildRunner) -> None:
    """Cancel on the CI before recording a result we decided on: the build may be running."""
    try:
        runner.cancel(BuildID(build.build_id))
    except RunnerError as err:  # record the result anyway; the runner may be gone
        log.warning("cancel_failed", build_id=build.build_id, error=str(err)[:300])


def finish(
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
