"""Reading the daemon's ops endpoint over HTTP, as Prometheus would."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support.daemon import DaemonProcess
from tests.support.waiting import wait_until


def ops_port(daemon: DaemonProcess) -> int:
    """The port the daemon's ops endpoint listens on (the test config asks for port 0)."""
    events = wait_until(
        lambda: [
            e for e in daemon.events(len(daemon.runs) - 1) if e["event"] == "ops_http_listening"
        ],
        message="ops_http_listening",
    )
    return int(events[-1]["port"])


def get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)


@dataclass(frozen=True)
class Scrape:
    samples: list[Sample]

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 if none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """``name``'s samples by their sorted label pairs."""
        return {tuple(sorted(s.labels.items())): s.value for s in self.samples if s.name == name}

    def label_values(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for sample in self.samples:
            for key, value in sample.labels.items():
                out.setdefault(key, set()).add(value)
        return out


def scrape(port: int) -> Scrape:
    response = get(port, "/metrics")
    assert response.status_code == 200, response.text
    families = text_string_to_metric_families(response.text)
    return Scrape([sample for family in families for sample in family.samples])
