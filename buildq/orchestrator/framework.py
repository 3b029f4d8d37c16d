"""The consumer framework: subscriptions → fetchers → partition-ordered workers → outcomes.

Controllers only decide; this module turns their decision into ack / nack / reject:

- ``handle`` returns an ``Effect`` (or None): it runs in one transaction together with the
  ack, so "done with this, and here is the next step" commits as one.
- ``Retry`` (or a transient runner/database error) → nack with the backoff policy.
- ``Unprocessable`` (or a malformed payload) → reject to the DLQ with the reason.
- Anything else is a bug or an unknown failure → reject with the error: non-retryable is
  the default, a controller opts into retry.

Deliveries of one partition always go to the same worker thread, so they are processed in
order. On stop, fetching ends first, queued deliveries are handed back without counting a
retry, and in-flight ones get ``grace_s`` to finish.
"""

from __future__ import annotations

import queue
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from structlog.contextvars import bind_contextvars, clear_contextvars

from buildq.buildrunner import MalformedPayload, TransientRunnerError
from buildq.orchestrator.store import BuildWrites
from buildq.queue.contract import (
    Delivery,
    DeliveryLost,
    InvalidMessage,
    Subscription,
    Transaction,
    TransientQueueError,
)

log = structlog.get_logger("buildq.consumer")


@dataclass
class StepTx:
    """What an effect may touch: the queue transaction and the build store in it."""

    queue: Transaction
    builds: BuildWrites


Effect = Callable[[StepTx], None]


class Retry(Exception):
    """Try this delivery again later (counts as a failure: DLQ after max_attempts)."""

    def __init__(self, reason: str, delay_ms: int | None = None) -> None:
        super().__init__(reason)
        self.delay_ms = delay_ms


class Unprocessable(Exception):
    """This message can never be processed: send it to the DLQ with the reason."""


class Controller(Protocol):
    topic: str

    def handle(self, delivery: Delivery) -> Effect | None: ...


class StepRunner(Protocol):
    """Runs an effect plus the ack in one transaction (retrying transient failures)."""

    def __call__(self, delivery: Delivery, effect: Effect | None) -> None: ...


EventHook = Callable[..., None]


class ConsumerMetrics(Protocol):
    """What the consumer reports (buildq.metrics.Metrics); labels are topic and group."""

    def observe_delivery(self, topic: str, group: str, outcome: str, seconds: float) -> None: ...

    def observe_dispatch_lag(self, topic: str, group: str, seconds: float) -> None: ...


class Consumer:
    """Runs controllers over their subscriptions with a shared pool of ordered workers."""

    def __init__(
        self,
        step: StepRunner,
        *,
        workers: int = 8,
        on_event: EventHook | None = None,
        metrics: ConsumerMetrics | None = None,
    ) -> None:
        self._step = step
        self._on_event = on_event
        self._metrics = metrics
        self._stop = threading.Event()
        self._routes: list[tuple[Controller, Subscription]] = []
        self._queues: list[
            queue.SimpleQueue[tuple[Controller, Subscription, Delivery, float] | None]
        ] = [queue.SimpleQueue() for _ in range(workers)]
        self._threads: list[threading.Thread] = []
        self._busy: list[tuple[Subscription, Delivery] | None] = [None] * workers
        self._inflight: dict[int, int] = {}  # id(subscription) -> fetched, not yet settled
        self._capacity = threading.Condition()
        #: ids of deliveries stop() handed back while a worker still ran them.
        self._handed_back: set[int] = set()
        self.last_tick: dict[str, float] = {}

    def add(self, controller: Controller, subscription: Subscription) -> None:
        self._routes.append((controller, subscription))

    def start(self) -> None:
        for index, _ in enumerate(self._queues):
            self._spawn(f"worker-{index}", self._work, index)
        for controller, subscription in self._routes:
            self._inflight[id(subscription)] = 0
            self._spawn(f"fetch-{subscription.topic}", self._fetch_loop, controller, subscription)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # --- fetching ------------------------------------------------------------------------

    def _fetch_loop(self, controller: Controller, subscription: Subscription) -> None:
        settings = getattr(subscription, "settings", None)
        batch = getattr(settings, "batch_size", 32)
        idle_s = getattr(settings, "poll_interval_ms", 200) / 1000
        # Claimed deliveries wait in memory only briefly: their visibility timeout runs meanwhile.
        limit = min(batch * 2, max(2, len(self._queues) * 2))
        fetch_now = True
        while not self._stop.is_set():
            self.last_tick[subscription.topic] = time.monotonic()
            try:
                room = self._wait_for_room(subscription, limit)
                if room <= 0:
                    continue
                if not fetch_now:
                    due = subscription.next_due_ms()
                    if due is None or due > 0:
                        wait_s = idle_s if due is None else min(idle_s, due / 1000)
                        fetch_now = subscription.wait(wait_s)  # type: ignore[attr-defined]
                        if not fetch_now and due is not None and due <= wait_s * 1000:
                            fetch_now = True
                        continue
                deliveries = subscription.fetch(min(batch, room))
                fetch_now = len(deliveries) == min(batch, room)
                self._dispatch(controller, subscription, deliveries)
            except Exception as err:  # database down: keep trying, /readyz reports it
                log.warning("fetch_failed", topic=subscription.topic, error=str(err)[:300])
                self._emit("fetch_failed", topic=subscription.topic)
                self._stop.wait(min(5.0, idle_s * 10))
                fetch_now = False

    def _wait_for_room(self, subscription: Subscription, limit: int) -> int:
        """Wait until at least half the buffer is free: under load, refilling it one delivery
        at a time would cost a claim transaction per delivery (bench: 1.4 claimed per claim)."""
        low_water = limit // 2
        with self._capacity:
            while not self._stop.is_set() and self._inflight[id(subscription)] > low_water:
                self._capacity.wait(0.5)
            return limit - self._inflight[id(subscription)]

    def _dispatch(
        self, controller: Controller, subscription: Subscription, deliveries: Sequence[Delivery]
    ) -> None:
        with self._capacity:
            self._inflight[id(subscription)] += len(deliveries)
        for delivery in deliveries:
            lag_s = _dispatch_lag_s(delivery)
            if self._metrics is not None and lag_s is not None:
                self._metrics.observe_dispatch_lag(delivery.topic, delivery.group, lag_s)
            key = f"{delivery.topic}\0{delivery.message.partition_key}".encode()
            self._queues[zlib.crc32(key) % len(self._queues)].put(
                (controller, subscription, delivery, time.monotonic())
            )

    def _done(self, subscription: Subscription, count: int = 1) -> None:
        with self._capacity:
            self._inflight[id(subscription)] -= count
            self._capacity.notify_all()

    # --- working ---------------------------------------------------------------------------

    def _work(self, index: int) -> None:
        inbox = self._queues[index]
        while True:
            item = inbox.get()
            if item is None:
                return
            controller, subscription, delivery, fetched_at = item
            if self._stop.is_set():
                self._hand_back(subscription, delivery)
                continue
            self._busy[index] = (subscription, delivery)
            try:
                if self._still_ours(controller, subscription, delivery, fetched_at):
                    self._process(controller, delivery)
            finally:
                self._busy[index] = None
                self._done(subscription)

    def _still_ours(
        self,
        controller: Controller,
        subscription: Subscription,
        delivery: Delivery,
        fetched_at: float,
    ) -> bool:
        """Renew the claim of a delivery that waited long in memory, or that starts a step which
        must not run twice (a trigger): if its visibility ran out, it may be redelivered while
        we work on it. False if the claim is already gone (someone else has it now)."""
        settings = getattr(subscription, "settings", None)
        timeout_ms = int(getattr(settings, "visibility_timeout_ms", 60_000))
        waited_ms = (time.monotonic() - fetched_at) * 1000
        if not getattr(controller, "renew_claim_first", False) and waited_ms < timeout_ms / 2:
            return True
        try:
            delivery.extend_visibility(timeout_ms)
        except DeliveryLost:
            log.warning(
                "delivery_expired_before_start", topic=delivery.topic, waited_ms=int(waited_ms)
            )
            return False
        except Exception as err:  # the database is struggling: process anyway, as fetched
            log.warning("claim_renewal_failed", error=str(err)[:300])
        return True

    def _process(self, controller: Controller, delivery: Delivery) -> None:
        clear_contextvars()
        bind_contextvars(
            topic=delivery.topic, message_id=delivery.message.id, attempt=delivery.attempt
        )
        started = time.monotonic()
        outcome = "ack"
        try:
            effect = controller.handle(delivery)
            self._step(delivery, effect)
        except DeliveryLost as err:
            outcome = "lost"
            log.warning("delivery_lost", reason=str(err))
        except (Retry, TransientRunnerError, TransientQueueError) as err:
            outcome = self._settle(delivery, "nack", err)
        except (Unprocessable, MalformedPayload, InvalidMessage) as err:
            outcome = self._settle(delivery, self._reject_or_retry(controller), err)
        except Exception as err:
            outcome = self._settle(
                delivery, self._reject_or_retry(controller), err, unexpected=True
            )
        else:
            log.debug("delivery_acked")
        finally:
            elapsed = time.monotonic() - started
            if self._metrics is not None:
                self._metrics.observe_delivery(delivery.topic, delivery.group, outcome, elapsed)
            self._emit(
                "processed", topic=delivery.topic, message_id=delivery.message.id, outcome=outcome
            )
            clear_contextvars()

    @staticmethod
    def _reject_or_retry(controller: Controller) -> str:
        # A dead-letter consumer that fails must not dead-letter in turn (into a `_dlq_dlq`
        # nobody reads, where the build would silently stay unfinished): it retries instead.
        return "nack" if getattr(controller, "never_dead_letter", False) else "reject"

    def _settle(
        self, delivery: Delivery, outcome: str, err: BaseException, *, unexpected: bool = False
    ) -> str:
        """Nack or reject a failed delivery; returns the outcome to count."""
        if id(delivery) in self._handed_back:
            # stop() already gave it back (its grace ran out): whatever the work ran into
            # since (a closed client, the settled delivery), nothing was rejected or failed.
            log.info("handed_back_delivery_ended", error=_describe(err)[:300])
            return "handed_back"
        if unexpected:
            log.exception("handler_failed")
        reason = ("unexpected error: " if unexpected else "") + _describe(err)
        log.warning(f"delivery_{outcome}ed", error=reason, retry_count=delivery.retry_count)
        try:
            if outcome == "nack":
                delivery.nack(_delay(err), error=reason)
            else:
                delivery.reject(reason)
        except DeliveryLost as lost:
            log.warning("delivery_lost", reason=str(lost))
        except Exception as failed:  # the visibility timeout brings it back
            log.error("settle_failed", outcome=outcome, error=str(failed)[:300])
        return outcome

    def _hand_back(self, subscription: Subscription, delivery: Delivery) -> None:
        try:
            subscription.hand_back([delivery])
        except Exception as err:
            log.warning("hand_back_failed", error=str(err)[:300])
        finally:
            self._done(subscription)

    # --- stopping -----------------------------------------------------------------------------

    def stop(self, grace_s: float) -> None:
        """Stop fetching, hand back what was not started, give running work ``grace_s``."""
        self._stop.set()
        for _, subscription in self._routes:
            wake = getattr(subscription, "wake", None)
            if wake is not None:
                wake()
        with self._capacity:
            self._capacity.notify_all()
        for inbox in self._queues:
            inbox.put(None)
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        still_busy = [b for b in self._busy if b is not None]
        for subscription, delivery in still_busy:
            log.warning(
                "handback_after_grace", topic=delivery.topic, message_id=delivery.message.id
            )
            self._handed_back.add(id(delivery))
            self._hand_back(subscription, delivery)

    def healthy(self, max_age_s: float) -> bool:
        now = time.monotonic()
        ticks = [self.last_tick.get(s.topic) for _, s in self._routes]
        return all(t is not None and now - t < max_age_s for t in ticks)

    def _emit(self, event: str, **data: Any) -> None:
        if self._on_event is not None:
            self._on_event(event, **data)


def _dispatch_lag_s(delivery: Delivery) -> float | None:
    """Claimed minus due, for deliveries that carry both (SqlDelivery's claim fills them)."""
    due_ms = getattr(delivery, "due_at_ms", 0)
    delivered_ms = getattr(delivery, "delivered_at_ms", 0)
    return (delivered_ms - due_ms) / 1000 if due_ms and delivered_ms else None


def _delay(err: BaseException) -> int | None:
    return err.delay_ms if isinstance(err, Retry) else None


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:2000]
