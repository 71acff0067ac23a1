"""Stable identifiers, seeds and shard assignment.

Everything the pipeline decides per record (which node labels it, which random stream samples its
completions) is a pure function of the record's id. That is what makes a run resumable and
distributable: a node that restarts, or a different node count on the same input, recomputes the
same decisions, so a resumed run's output equals an uninterrupted one and shards never overlap.
Python's built-in `hash` is salted per process, so everything here goes through SHA-256.
"""

from __future__ import annotations

import hashlib

#: Seeds stay below 2**31 minus room for the per-completion offset (completion j of a request
#: with seed s draws from s + j), so every backend (the JAX sampler takes uint32, vLLM any int)
#: sees the same non-negative value.
_SEED_RANGE = 2**31 - 2**16


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of the parts' string forms, identical in every process and on every machine."""
    joined = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(joined).digest()[:8], "little")


def stable_seed(base_seed: int, stage: str, *parts: object) -> int:
    """The sampling seed of one request, e.g. `stable_seed(0, "mc", response_id, step)`."""
    return stable_hash(base_seed, stage, *parts) % _SEED_RANGE


def shard_of(record_id: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) that owns a problem id: a stable hash partition.

    A hash (rather than contiguous index ranges) needs no global count, works while streaming the
    input, and spreads long and short problems evenly over the nodes.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return stable_hash("shard", record_id) % num_shards


def response_id(problem_id: str, index: int) -> str:
    """The id of response `index` of a problem; responses inherit their problem's shard."""
    return f"{problem_id}#{index}"


def content_id(prefix: str, *parts: str) -> str:
    """An id derived from content, for inputs without ids (GSM8K, MATH): stable under reordering."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}-{digest}"
