"""API keys: who may call which route.

Each router declares the access its routes need once, as :class:`Rule` s (``/admin/`` needs the admin
key, ``/health`` is open, ...); :class:`Auth` checks a request's ``Authorization: Bearer KEY``
against the first rule that matches, before any work is done. A service without any key (the local
default) is open, admin routes included. With API keys, every route that is not open needs one of
them (or the admin key). Admin routes need the admin key whenever the service has a key of any kind,
and are refused (403) when it has API keys but no admin key.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from embedfleet.api import errors


class Access(Enum):
    """What a route needs."""

    OPEN = "open"
    API = "api"
    ADMIN = "admin"


@dataclass(frozen=True)
class Rule:
    """Routes under ``prefix`` (exactly ``path`` when ``exact``), for ``methods`` (all when empty), need ``access``."""

    prefix: str
    access: Access
    methods: frozenset[str] = frozenset()
    exact: bool = False

    def matches(self, method: str, path: str) -> bool:
        """Whether this rule covers the request."""
        if self.methods and method not in self.methods:
            return False
        return path == self.prefix if self.exact else path.startswith(self.prefix)


HEALTH_RULES = (Rule("/health", Access.OPEN, exact=True), Rule("/ping", Access.OPEN, exact=True),
                Rule("/metrics", Access.OPEN, exact=True), Rule("/", Access.OPEN, frozenset({"GET"}), exact=True))
"""Health checks and metrics: open, so probes and scrapers need no key (TEI does the same)."""


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


class Auth:
    """The keys of a service and the access rules of its routes."""

    def __init__(self, api_keys: Iterable[str] = (), admin_key: str | None = None,
                 rules: Sequence[Rule] = HEALTH_RULES) -> None:
        self.api_keys = tuple(k for k in api_keys if k)
        self.admin_key = admin_key or None
        self.rules: tuple[Rule, ...] = tuple(rules)

    @property
    def open(self) -> bool:
        """No key at all: every route is open."""
        return not self.api_keys and self.admin_key is None

    def declare(self, *rules: Rule) -> None:
        """Add a router's rules (checked before the ones already declared, so more specific rules win)."""
        self.rules = (*rules, *self.rules)

    def access(self, method: str, path: str) -> Access:
        """What the route needs: its first matching rule's access, else an API key."""
        return next((r.access for r in self.rules if r.matches(method, path)), Access.API)

    def check(self, method: str, path: str, authorization: str | None) -> None:
        """Raise 401/403 unless the request carries the key its route needs."""
        if self.open:
            return
        access = self.access(method, path)
        if access is Access.OPEN or (access is Access.API and not self.api_keys):
            return
        token = _bearer(authorization)
        if access is Access.ADMIN:
            if self.admin_key is None:
                raise errors.forbidden("admin routes are off: this service has API keys but no admin key "
                                       "(--admin-key)")
            if token is None or not _matches(token, [self.admin_key]):
                raise errors.unauthorized("this route needs the admin key (Authorization: Bearer ADMIN_KEY)")
            return
        if token is None or not _matches(token, [*self.api_keys, *([self.admin_key] if self.admin_key else [])]):
            raise errors.unauthorized()
