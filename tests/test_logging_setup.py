"""Log lines: extra fields appended, uvicorn's duplicate coloured message left out."""

from __future__ import annotations

import logging

import orjson

from embedfleet.logging_setup import JsonFormatter, TextFormatter


def _record() -> logging.LogRecord:
    """A record the way uvicorn logs one: its message again, with ANSI colours, in ``color_message``."""
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (42,), None)
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    record.instance = "embed-0"
    return record


def test_text_lines_carry_extras_but_not_color_message() -> None:
    line = TextFormatter().format(_record())
    assert line.endswith("INFO uvicorn.error Started server process [42] instance=embed-0")
    assert "color_message" not in line and "\x1b" not in line


def test_json_lines_carry_extras_but_not_color_message() -> None:
    entry = orjson.loads(JsonFormatter().format(_record()))
    assert entry["msg"] == "Started server process [42]" and entry["instance"] == "embed-0"
    assert "color_message" not in entry
