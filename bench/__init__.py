"""buildq's benchmarks: figures next to the raw database ceiling (see docs/BENCHMARKS.md)."""
