"""Prefix cache: the KV state of many prompts, in RAM and on SSD, reused across requests, clients and restarts.

Design. A cached prefix (an *entry*) of ``n`` tokens is the state a cold prefill of
those tokens leaves in the model's caches:

- full-attention layers: K/V rows ``0..n``, stored as fixed-size *blocks* of
  ``block_size`` positions named by a hash chain (block k's name hashes the cache key
  and tokens ``0..(k+1)*block``), so entries with a common prefix share the blocks;
  the rows after the last whole block are the entry's *tail*;
- sliding-window layers: a copy of each ring as it was at ``n`` (a ring cannot be
  rebuilt from a longer conversation's ring), with its offset and ``low``.

Entries are captured where requests diverge: the end of every prompt, the end of
every reply, and the boundary after the system prompt and tools (``ChatSession``
prefills up to it first, so parallel conversations sharing it hit). A lookup takes
the entry with the longest common prefix ``d`` with the new prompt such that every
ring can roll back from ``n`` to ``d`` exactly (``SlidingKVCache.max_trim``; any ``d``
before the ring has wrapped), capped at ``len(prompt) - 1``; full layers are
restored from the blocks and tail cut at ``d``. The restored state is bit for bit
the cold one, so logits and greedy tokens match a cold prefill (float KV).

MTP module caches are not stored: the drafter restarts at the first uncached
token, as it does for any reused prefix; verification keeps the output exact,
only the first drafts' acceptance is lower.

Tiers: RAM entries are evicted least recently used first when the RAM bytes (every
array held, shared blocks once) pass ``ram_bytes``; with a disk tier every entry is
also written (after its turn, ``flush``) and an evicted entry stays there, loaded
back on a hit. Disk files live in ``cache_dir/<model fingerprint>-<KV dtype and bits>-s<slack>-b<block>/``,
one safetensors file per block and per entry, written atomically, evicted LRU by
bytes on disk; damaged or foreign files are deleted with a warning (:mod:`.disk`).
"""

from .budget import parse_budget
from .store import DEFAULT_BLOCK, DEFAULT_CACHE_DIR, CacheUsage, Hit, PrefixCache, model_fingerprint

__all__ = ["PrefixCache", "Hit", "CacheUsage", "DEFAULT_BLOCK", "DEFAULT_CACHE_DIR", "model_fingerprint",
           "parse_budget"]
