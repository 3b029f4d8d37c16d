"""What a benchmark reports: its figures next to the ceiling, as a line and a JSON record.

Every figure is reported next to a ceiling measured in the same run (the machine is shared and
noisy, so absolute numbers from different runs do not compare; ratios do). A result is one JSON
line appended to ``bench/results/results.jsonl`` and one summary line on stdout::

    BENCH <name> <metric>=<value> … ratio=<r>
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_FILE = RESULTS_DIR / "results.jsonl"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


@dataclass
class Result:
    """One benchmark on one backend: its figures, the ceiling beside them, one headline ratio."""

    bench: str
    backend: str
    metrics: dict[str, Any]
    ceiling: dict[str, Any]
    ratio: float
    ratio_means: str  # what the headline ratio divides by what
    target: str = ""
    met: bool | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.bench}.{self.backend}"

    def line(self) -> str:
        figures = {**self.metrics, **{f"ceil_{k}": v for k, v in self.ceiling.items()}}
        parts = [f"{key}={_fmt(value)}" for key, value in figures.items()]
        return f"BENCH {self.name} {' '.join(parts)} ratio={_fmt(self.ratio)}"


class Recorder:
    """Prints each result's BENCH line and appends it as a JSON line, tagged with the run."""

    def __init__(self, run: Mapping[str, Any], path: Path = RESULTS_FILE) -> None:
        self.run = dict(run)
        self.path = path
        self.results: list[Result] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._append({"kind": "run", **self.run})

    def record(self, result: Result) -> None:
        self.results.append(result)
        self._append(
            {
                "kind": "result",
                "run_id": self.run["run_id"],
                "profile": self.run["profile"],
                "name": result.name,
                "bench": result.bench,
                "backend": result.backend,
                "metrics": result.metrics,
                "ceiling": result.ceiling,
                "ratio": result.ratio,
                "ratio_means": result.ratio_means,
                "target": result.target,
                "met": result.met,
                "notes": result.notes,
            }
        )
        print(result.line(), flush=True)

    def _append(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only BENCH lines."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
