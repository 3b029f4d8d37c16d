"""How long and how wide each benchmark runs: the ``quick`` and ``full`` profiles."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """How long and how wide each benchmark runs. ``quick`` fits in 5 minutes for both backends."""

    name: str
    benches: tuple[str, ...]  # what ``python -m bench`` runs without --only
    rounds: int  # P1/P2 alternate ceiling and figure this many times (noise hits both alike)
    ceiling_s: float  # per ceiling measurement (one statement shape, one connection count)
    p1_s: float  # per (mode, threads) measurement
    p1_threads: tuple[int, ...]
    p1_builds: int  # partitions (builds) cycling through the topic
    p2_s: float
    p2_threads: tuple[int, ...]
    p2_batch: int
    p3_window_s: float
    p3_builds: tuple[int, int]
    p4_s: float
    p4_rates: tuple[int, ...]  # the first is the target rate; the others show the precision
    p5_saturate_s: float
    p5_verify_s: float
    p5_daemons: tuple[int, ...]
    p5_levels: tuple[int, ...]  # extra fixed levels checked at the real cadence (full only)
    e2e_requests: int
    peers_builds: int  # builds of the peers' workload (each polled 5 times)
    pyspy: bool = False  # record py-spy profiles of P1 and P5 (see bench/profiling.py)


PROFILES = {
    "quick": Profile(
        name="quick",
        # The stand-alone ceiling table is left out: every benchmark measures its own.
        benches=("p1", "p2", "p3", "p4", "p5", "e2e", "peers"),
        rounds=2,
        ceiling_s=1.0,
        p1_s=1.2,
        p1_threads=(1, 4, 16),
        p1_builds=3_000,
        p2_s=1.0,
        p2_threads=(1,),
        p2_batch=100,
        p3_window_s=10.0,  # the metrics refresher runs every 10 s: one run per window
        p3_builds=(100, 10_000),
        p4_s=6.0,
        p4_rates=(1_000, 200),
        p5_saturate_s=8.0,
        p5_verify_s=0.0,
        p5_daemons=(1, 3),
        p5_levels=(),
        e2e_requests=500,
        peers_builds=1_000,
    ),
    "full": Profile(
        name="full",
        benches=("ceiling", "p1", "p2", "p3", "p4", "p5", "e2e", "peers"),
        rounds=3,
        ceiling_s=3.0,
        p1_s=4.0,
        p1_threads=(1, 4, 16),
        p1_builds=5_000,
        p2_s=3.0,
        p2_threads=(1, 4),
        p2_batch=100,
        p3_window_s=30.0,
        p3_builds=(100, 10_000),
        p4_s=30.0,
        p4_rates=(1_000, 500, 200),
        p5_saturate_s=15.0,
        p5_verify_s=40.0,
        p5_daemons=(1, 2, 3),
        p5_levels=(10_000,),
        e2e_requests=3_000,
        peers_builds=1_000,
    ),
}
