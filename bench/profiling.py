"""Where the time goes: py-spy recordings of a benchmark's measured window, summarised.

``python -m bench --py-spy`` records P1 (this process) and P5 (the daemon process) twice at
once: a GIL profile (``--gil``: only the thread holding the GIL, i.e. where Python spends its
one core) and a wall-clock profile (``--idle``: every thread, waiting or not). Raw collapsed stacks land in ``bench/results/``
as ``*.pyspy.tmp`` (git-ignored); the summary goes into the result's notes:

- ``gil_busy``: GIL samples / (duration × rate) — the share of the time some thread held the
  GIL. Near 1, Python itself is the bottleneck: more threads cannot help.
- ``cpu_by_package``: the GIL samples by the package of the innermost frame (sqlalchemy,
  pymysql, socket — a send/recv that has not released the GIL yet —, buildq, structlog, …).
- ``wall_by_step``: for worker threads, the share of wall time inside each step of a cycle
  (fetch, handler, the hand-off transaction and its statements, COMMIT, waiting for work).
- ``top_cpu``: the innermost frames with the most GIL samples.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.report import RESULTS_DIR

RATE_HZ = 200
#: Steps of a cycle, by a function that is on the stack while the step runs.
STEPS = {
    "fetch (claim transaction)": "SqlSubscription.fetch",
    "plan (build reads, decoding)": ".plan (",
    "jobs (runner calls, decisions)": "Worker._run",
    "hand-off (batch commit)": "SqlCommitter.commit",
    "  fence (lease read)": "_fence (",
    "  publish (INSERT + fan-out)": "_publish",
    "  ack (DELETE)": "_delete_acked",
    "  build store writes": "SqlBuildBatch.",
    "  Database.begin: write lock, checkout, BEGIN, COMMIT": "Database.begin",
    "  COMMIT": "Transaction.commit",
    "keeping claims alive": "keep_claims_alive",
    "idle (waiting for work)": "Condition.wait",
}
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


@contextmanager
def recording(pid: int, seconds: float, name: str) -> Iterator[dict[str, Any]]:
    """Record ``pid`` for ``seconds`` from now (CPU and wall); the summary is filled in on exit."""
    summary: dict[str, Any] = {}
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    paths = {kind: RESULTS_DIR / f"{name}.{kind}.pyspy.tmp" for kind in ("cpu", "wall")}
    base = [spy, "record", "--format", "raw", "--rate", str(RATE_HZ), "--threads"]
    base += ["--nonblocking", "--pid", str(pid), "--duration", str(max(1, int(seconds)))]
    procs = {
        kind: subprocess.Popen(
            [*base, "-o", str(path), "--idle" if kind == "wall" else "--gil"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for kind, path in paths.items()
    }
    try:
        yield summary
    finally:
        for proc in procs.values():
            proc.wait(timeout=seconds + 60)
        if all(path.exists() for path in paths.values()):
            summary.update(summarize(paths["cpu"], paths["wall"], seconds))
        else:
            summary["error"] = "py-spy produced no output (permissions? ptrace_scope?)"


def _stacks(path: Path) -> Iterator[tuple[list[str], int]]:
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield stack.split(";"), int(count)


def _package(frame: str) -> str:
    match = _FRAME.match(frame)
    file = match.group("file") if match else frame
    func = match.group("func") if match else frame
    if func.startswith(("DefaultDialect.do_execute", "DefaultDialect.do_commit")) or (
        "sqlite" in file and "sqlalchemy" not in file
    ):
        return "driver C / db (do_execute, do_commit)"
    for package in ("sqlalchemy", "pymysql", "structlog", "tenacity", "buildq", "bench"):
        if f"{package}/" in file or file.startswith(package):
            return package
    if file.endswith("socket.py"):
        return "socket"
    return "stdlib/other"


def summarize(cpu: Path, wall: Path, seconds: float) -> dict[str, Any]:
    cpu_total = 0
    by_package: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for frames, count in _stacks(cpu):
        cpu_total += count
        by_package[_package(frames[-1])] += count
        leaves[re.sub(r":\d+\)$", ")", frames[-1])] += count
    steps: Counter[str] = Counter()
    worker_total = 0
    for frames, count in _stacks(wall):
        if not re.search(r"worker-\d+$", frames[0]):
            continue
        worker_total += count
        joined = ";".join(frames) + ";"
        for label, marker in STEPS.items():
            if marker in joined:
                steps[label] += count

    def share(counter: Counter[str], total: int) -> dict[str, float]:
        return {k: round(v / max(1, total), 3) for k, v in counter.most_common()}

    return {
        "gil_busy": round(cpu_total / (RATE_HZ * seconds), 2),
        "cpu_by_package": share(by_package, cpu_total),
        "wall_by_step": {k: round(steps[k] / max(1, worker_total), 3) for k in STEPS},
        "top_cpu": share(Counter(dict(leaves.most_common(12))), cpu_total),
    }
