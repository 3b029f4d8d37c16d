"""A consumer group member as a real process, for the scale-out tests.

    python -m tests.system.scale.member URL TOPIC GROUP OUT.jsonl [--slots N] [--work-ms N] ...

Consumes TOPIC as GROUP, acks each message after ``--work-ms`` of "work", and appends one
JSON line per event to OUT (handled, acked, lost, leases, stopped). SIGTERM: hand back what was
fetched but not processed, release leases, deregister, exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from typing import Any

from buildq.queue import DeliveryLost
from buildq.queue.settings import Backoff, SubscriptionSettings
from buildq.queue.sql import SqlQueue
from buildq.storage.database import Database, create_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("topic")
    parser.add_argument("group")
    parser.add_argument("out")
    parser.add_argument("--slots", type=int, default=12)
    parser.add_argument("--lease-ms", type=int, default=1500)
    parser.add_argument("--renew-ms", type=int, default=250)
    parser.add_argument("--visibility-ms", type=int, default=4000)
    parser.add_argument("--work-ms", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    out = open(args.out, "a", buffering=1)  # noqa: SIM115 (the process's lifetime)
    lock = threading.Lock()

    def record(event: str, **data: Any) -> None:
        with lock:
            out.write(
                json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **data}) + "\n"
            )

    def on_event(event: str, **data: Any) -> None:
        if event == "leases_changed":
            record("leases", slots=data["slots"])

    settings = SubscriptionSettings(
        slots=args.slots,
        lease_duration_ms=args.lease_ms,
        renew_interval_ms=args.renew_ms,
        heartbeat_stale_ms=args.lease_ms,
        visibility_timeout_ms=args.visibility_ms,
        max_attempts=50,
        backoff=Backoff(initial_ms=100, jitter=0.0),
        poll_interval_ms=50,
        batch_size=args.batch,
    )
    db = Database(create_engine(args.url, pool_size=4))
    queue = SqlQueue(db)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sub = queue.subscribe(args.topic, args.group, settings, on_event=on_event)
    record("started", member=sub.member_id)
    while not stop.is_set():
        batch = sub.fetch(args.batch)
        if not batch:
            sub.wait(0.05)
            continue
        for delivery in batch:
            if stop.is_set():
                break  # the rest is handed back by close()
            record("fetched", id=delivery.message.id, key=delivery.message.partition_key)
            if args.work_ms:
                time.sleep(args.work_ms / 1000)  # the "work" of this consumer, not a test wait
            # "handled" before the ack, "acked" after: a kill between the two must not hide
            # a message from the test's at-least-once check.
            record(
                "handled",
                id=delivery.message.id,
                key=delivery.message.partition_key,
                retry_count=delivery.retry_count,
                attempt=delivery.attempt,
            )
            try:
                delivery.ack()
            except DeliveryLost:
                record("lost", id=delivery.message.id)
                continue
            record("acked", id=delivery.message.id)
    sub.close()
    record("stopped")
    db.dispose()


if __name__ == "__main__":
    main()
