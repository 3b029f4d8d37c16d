"""buildq's benchmarks: figures next to the raw database ceiling (see docs/BENCHMARKS.md)."""

from pathlib import Path

#: The checkout the benchmarks run from.
ROOT = Path(__file__).resolve().parent.parent
