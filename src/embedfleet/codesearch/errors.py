"""The one error code search reports to its user (the CLI prints it, the UI answers it as JSON)."""

from __future__ import annotations


class CodeSearchError(Exception):
    """Something the user can act on: a gateway that refuses, a missing reranker, a failed clone."""
