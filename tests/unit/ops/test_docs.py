"""The alert rules and scrape config in docs/operations.md fit together (issue 15, item 9).

There is no Prometheus here to load them; these checks read the YAML as text.
"""

from __future__ import annotations

import re

from buildq.config import HttpConfig
from tests.support import REPO

OPERATIONS = REPO / "docs" / "operations.md"


def _yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", OPERATIONS.read_text(), flags=re.S)


def _rule(name: str) -> str:
    [rules] = [b for b in _yaml_blocks() if "groups:" in b]
    match = re.search(rf"- alert: {name}\n(.*?)(?=\n\s*- alert:|\Z)", rules, flags=re.S)
    assert match is not None, name
    return match.group(1)


def test_dead_letters_summary_is_a_whole_number() -> None:
    rule = _rule("BuildqDeadLettersGrowing")
    [expr] = re.findall(r"expr: (.*)", rule)
    assert "delta(" not in expr  # extrapolates: 1 new dead letter reads 1.0714...
    assert '{{ $value | printf "%.0f" }}' in rule


def test_the_scrape_job_is_the_one_buildqdown_watches() -> None:
    jobs = set(re.findall(r'up\{job="([^"]+)"\}', _rule("BuildqDown")))
    [scrape] = [b for b in _yaml_blocks() if "scrape_configs:" in b]
    assert jobs == set(re.findall(r"job_name: (\S+)", scrape)) == {"buildq"}
    assert f"127.0.0.1:{HttpConfig().port}" in scrape
