"""What a chaos run does: how many builds, which faults when, and the daemons' config.

The bounded run is what CI runs (``tests/system/chaos/test_chaos.py``), so its phases overlap where
they can be told apart afterwards and it lasts about a minute of faults; ``--full``
(``make chaos``) spreads the same faults, plus a real MariaDB restart, over 1,000 builds.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.system.chaos.faults import Schedule

FAULTED_QUEUE = "b"
QUEUES = ("a", FAULTED_QUEUE)


@dataclass(frozen=True)
class Profile:
    builds: int
    submit_over_s: float
    schedule: Schedule
    drain_timeout_s: float
    real_restart: bool
    cancels: int
    daemons: int = 3


BOUNDED = Profile(
    builds=150,
    submit_over_s=55.0,
    # Every phase is over before the last build is submitted (55 s), so faults add nothing to
    # the run's length. The full disk comes first, on its own: the retries it causes (claims
    # that outlive their visibility timeout while it lasts, and in the backlog after it) must
    # be told apart from the status fault's, which are the ones that may dead-letter. The
    # clock step spans the others: it must change nothing whatever else happens.
    schedule=Schedule(
        duration_s=65.0,
        clock_step_at_s=4.0,
        clock_step_for_s=44.0,
        disk_full_at_s=6.0,
        disk_full_for_s=10.0,
        pause_at_s=18.0,
        pause_for_s=13.0,
        outage_at_s=33.0,
        outage_for_s=8.0,
        status_fault_at_s=45.0,
        status_fault_for_s=6.0,
    ),
    drain_timeout_s=120.0,
    real_restart=False,
    cancels=6,
)

FULL = Profile(
    builds=1000,
    submit_over_s=240.0,
    # One daemon's disk fills here (the bounded run fills all three): its leases move to the
    # others while its own writes are refused.
    schedule=Schedule(
        duration_s=250.0,
        clock_step_at_s=20.0,
        clock_step_for_s=180.0,
        pause_at_s=40.0,
        pause_for_s=13.0,
        disk_full_at_s=60.0,
        disk_full_for_s=15.0,
        disk_full_nodes=1,
        outage_at_s=100.0,
        outage_for_s=10.0,
        status_fault_at_s=170.0,
        status_fault_for_s=8.0,
    ),
    drain_timeout_s=300.0,
    real_restart=True,
    cancels=30,
)

#: Fast leases so a kill is taken over within seconds. The visibility timeout (10 s) stays
#: well above how long a claim may wait in a busy daemon's memory on a small CI machine: with
#: 4 s, claims of a CPU-starved (not faulted) daemon timed out there and were delivered twice
#: (reported: the framework does not renew a claim that waited before processing it). The
#: buildsignal retry budget (5 attempts: 0.3 + 0.6 + 1.2 + 2.4 s of backoff) outlasts a short
#: status fault for polls that meet its end and not for those that meet its start: both paths
#: are taken. Queue a's status calls can be held (``status_hang_file``), so they run in the
#: runner's lane of threads (queue b's run on the fetcher's thread: both paths are taken); the
#: full-disk phase holds them for a moment before the disk fills and lets them answer after,
#: so that every daemon has hand-offs to commit while its writes are refused.
#: The deadlines are far above any build's life here (seconds, a minute with the
#: faults) and far below the clock step (two hours): a daemon that read its deadlines off
#: the stepped wall clock would time builds out, and the audit fails the run on any timeout.
START_BY_S = 600
FINISH_BY_S = 1200
CONFIG = """\
[database]
url = "{url}"
pool_size = 6

[daemon]
shutdown_grace_s = 20
log_format = "json"
log_level = "debug"

[http]
port = 0

[consumer]
workers = 8

[consumer.defaults]
slots = 16
lease_duration_ms = 2000
renew_interval_ms = 300
heartbeat_stale_ms = 2000
visibility_timeout_ms = 10000
max_attempts = 5
backoff_initial_ms = 300
backoff_multiplier = 2.0
backoff_cap_ms = 3000
backoff_jitter = 0.0
poll_interval_ms = 50
batch_size = 16

[runners.sim_a]
type = "sim"
accepted_s = 0.5
accepted_max_s = 1.5
running_s = 1.5
running_max_s = 4.0
failure_probability = 0.3
state_dir = "{state}"
status_hang_file = "{hang}"

[runners.sim_b]
type = "sim"
accepted_s = 0.5
accepted_max_s = 1.5
running_s = 1.5
running_max_s = 4.0
failure_probability = 0.3
state_dir = "{state}"
status_fault_file = "{fault}"

[poll]
accepted_interval_s = 0.3
running_interval_s = 0.5
growth = 1.1
max_interval_s = 1.0
jitter = 0.2
start_by_s = {start_by_s}
finish_by_s = {finish_by_s}

[queues.a]
runner = "sim_a"

[queues.b]
runner = "sim_b"
"""
