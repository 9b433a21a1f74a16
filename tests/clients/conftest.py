"""Settings the client libraries read when they are imported: no telemetry, no hub access."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Haystack reads HAYSTACK_TELEMETRY_ENABLED once, on import: set it (and the hub's offline mode) before that."""
    os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("LANGSMITH_TRACING", "false")
