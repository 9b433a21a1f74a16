"""API keys: ``Authorization: Bearer KEY`` on every route but /health and /metrics; admin routes need
the admin key and are refused outright when none is configured."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from embedfleet.api import errors

OPEN_ROUTES = frozenset({"/health", "/ping", "/metrics"})
ADMIN_PREFIX = "/admin/"


def read_key_file(path: Path) -> list[str]:
    """One key per line; blank lines and # comments ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read API key file {path}: {exc}") from exc
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: Iterable[str]) -> bool:
    # Compare against every key, in constant time per key, so timing tells nothing.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


class KeyCheck:
    """Decides whether a request may proceed."""

    def __init__(self, api_keys: Iterable[str] = (), admin_key: str | None = None) -> None:
        self.api_keys = tuple(k for k in api_keys if k)
        self.admin_key = admin_key or None

    def check(self, path: str, authorization: str | None, admin: bool = False) -> None:
        """Raise 401/403 unless the request carries the key this route needs."""
        token = _bearer(authorization)
        if admin:
            if self.admin_key is None:
                raise errors.forbidden("admin routes are disabled: start the gateway with --admin-key")
            if token is None or not _matches(token, [self.admin_key]):
                raise errors.unauthorized("this route needs the admin key (Authorization: Bearer ADMIN_KEY)")
            return
        if path in OPEN_ROUTES or not self.api_keys or path.startswith(ADMIN_PREFIX):
            return  # admin routes check the admin key themselves, in their own error shape
        if token is None or not _matches(token, [*self.api_keys, *([self.admin_key] if self.admin_key else [])]):
            raise errors.unauthorized()
