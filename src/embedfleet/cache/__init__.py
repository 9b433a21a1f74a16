"""The embedding cache: content-addressed keys, checksummed values, one module per store.

A key covers everything that decides a vector (the model's fingerprint, every output-changing
parameter, the exact text), so a changed model or parameter can never hit an old entry; a value
carries its own length and checksum, so a torn or corrupt entry reads as a miss, never as a wrong
vector. Stores hold opaque bytes behind :class:`~embedfleet.cache.base.Store`.
"""

from embedfleet.cache.base import Store, StoreStats
from embedfleet.cache.codec import decode, encode
from embedfleet.cache.keys import KEY_SCHEMA_VERSION, EmbedParams, ModelFingerprint, cache_key

__all__ = [
    "KEY_SCHEMA_VERSION",
    "EmbedParams",
    "ModelFingerprint",
    "Store",
    "StoreStats",
    "cache_key",
    "decode",
    "encode",
]
