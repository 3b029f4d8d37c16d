"""Log lines of libraries (stdlib ``logging``) come out like buildq's own."""

from __future__ import annotations

import json
import logging

import pytest

from buildq import logs


def test_a_library_warning_is_a_json_line_with_its_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("info", "json")
    logs.configure("info", "json")  # reconfiguring must not double the handler
    try:
        logging.getLogger("some.library").warning("disk %s is slow", "sda")
    finally:
        for handler in list(logging.getLogger().handlers):
            if type(handler).__module__ == "buildq.logs":
                logging.getLogger().removeHandler(handler)
    [line] = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert event["event"] == "library_log" and event["level"] == "warning"
    assert event["logger"] == "some.library" and event["message"] == "disk sda is slow"
