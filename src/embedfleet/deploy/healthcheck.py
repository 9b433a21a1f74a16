"""The containers' health check: ``python -m embedfleet.deploy.healthcheck [URL]`` exits 0 when URL (default:
``$EMBEDFLEET_HEALTH_URL``, else the gateway's http://127.0.0.1:8080/health) answers 200 within 5 seconds.

The images have no curl; this needs nothing but the standard library. An HTTPS server's certificate is
not verified: the check calls the container's own loopback address.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8080/health"


def healthy(url: str, timeout: float = 5.0) -> bool:
    """Whether ``url`` answers 200 now."""
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return int(reply.status) == 200
    except (OSError, urllib.error.URLError):
        return False


def main() -> None:  # pragma: no cover - the command
    """Exit 0 when healthy, 1 otherwise."""
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EMBEDFLEET_HEALTH_URL", DEFAULT_URL)
    sys.exit(0 if healthy(url) else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
