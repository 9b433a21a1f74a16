"""The memory tier holds what its bound says: the process grows by at most 1.25x ``max_bytes`` however
small or large the vectors are (per-entry overhead counted, not only the bytes of keys and values)."""

from __future__ import annotations

import subprocess
import sys

import pytest

FILL = r"""
import os, sys
import numpy as np
from embedfleet.cache.memory import MemoryStore, entry_from_vector, render_json

def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

dim, bound = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
vectors = [rng.standard_normal(dim).astype(np.float32) for _ in range(64)]  # reused: the store copies each
store = MemoryStore(bound)
before = rss()
for batch in range(3 * bound // (dim * 4 + 40) // 256 + 8):  # three bounds' worth, in batches
    items = [(os.urandom(40), entry_from_vector(vectors[i % 64], 0.0, 7)) for i in range(256)]
    store.insert(items)
    for key, entry in items[::4]:  # rendered forms kept for some, as for entries a response served
        store.keep(key, entry, json=render_json(entry))
print(rss() - before)
"""


@pytest.mark.slow
@pytest.mark.parametrize("dim", [1, 16, 384, 4096])
def test_the_process_grows_by_at_most_the_bound(dim: int) -> None:
    bound = 48 * 1024 * 1024
    out = subprocess.run([sys.executable, "-c", FILL, str(dim), str(bound)], capture_output=True, text=True,
                         timeout=300, check=True)
    grown = int(out.stdout.strip())
    assert grown <= 1.25 * bound, f"{grown / bound:.2f}x the bound"
