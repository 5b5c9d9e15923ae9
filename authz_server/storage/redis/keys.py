"""Every Redis key name and SCAN pattern of the service, in one place.

All keys of one beneficiary share the hash tag {b:<8 hex of sha1(beneficiary)>} (its "slot
prefix" mw:{b:<digest>}). The tag is derived from the beneficiary, and an authorization id starts
with the same 8 hex digits, so Capture/Void/Get find the slot from the id alone. Beneficiaries
whose digests collide merely share a slot. Keys that belong to one beneficiary also carry its id.

The Lua scripts build some keys of their slot from data (`prefix .. ':q:' .. rid`): each suffix
they may use is in SCRIPT_SUFFIXES below, next to the Python builder of the same key
(tests/test_redis_keys.py fails on a script building a key with any other suffix).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import os
import re

from redis.crc import key_slot

TAG_LENGTH = 8


# An Authorize names its beneficiary's slot in five keys and arguments: the digest is computed
# once per beneficiary in this many recent ones, not once per use.
TAG_DIGESTS_CACHED = 16_384


@functools.lru_cache(maxsize=TAG_DIGESTS_CACHED)
def tag_digest(beneficiary_id: str) -> str:
    return hashlib.sha1(beneficiary_id.encode()).hexdigest()[:TAG_LENGTH]


def prefix_of_digest(digest: str) -> str:
    return f"mw:{{b:{digest}}}"


def prefix(beneficiary_id: str) -> str:
    return prefix_of_digest(tag_digest(beneficiary_id))


def prefix_of_authorization(authorization_id: str) -> str:
    return prefix_of_digest(authorization_id[:TAG_LENGTH])


# os.urandom lets go of the GIL for its system call, and another thread (SQL, gRPC's) then
# holds it until it lets go in turn: one call an Authorize cost the event loop ~15 µs of wall
# time under load (cProfile, RESULTS.md 2026-12-05). So the random part of the ids is drawn
# from the kernel this many at a time, and each id takes one from the pool.
AUTHORIZATION_IDS_PER_DRAW = 256
_RANDOM_HEX_DIGITS = 24  # 96 bits, as many as uuid4 has
_random_parts: collections.deque[str] = collections.deque()
# A forked child must not hand out the ids its parent drew: it draws its own.
os.register_at_fork(after_in_child=_random_parts.clear)


def _random_part() -> str:
    """24 hex digits from the kernel's random source, never the same ones twice: popping from
    a deque is atomic, so threads sharing the pool each get their own."""
    while True:
        try:
            return _random_parts.pop()
        except IndexError:
            drawn = os.urandom(_RANDOM_HEX_DIGITS // 2 * AUTHORIZATION_IDS_PER_DRAW).hex()
            _random_parts.extend(
                drawn[start : start + _RANDOM_HEX_DIGITS]
                for start in range(0, len(drawn), _RANDOM_HEX_DIGITS)
            )


def new_authorization_id(beneficiary_id: str) -> str:
    """32 characters: the beneficiary's tag digest, then 24 random hex digits (96 bits from the
    kernel's random source, as uuid4 takes them, without building a UUID)."""
    return tag_digest(beneficiary_id) + _random_part()


def quota(beneficiary_id: str, relationship_id: str) -> str:
    """HASH status, available, held, holder, beneficiary, scheme, order; r (the newest ledger
    entry the last restore counted), e (that restore's epoch) and v (the money version: one more
    each time a script changes available + held, or restores it; lua/quota_restore.lua)."""
    return f"{prefix(beneficiary_id)}:q:{relationship_id}"


def quota_holds(beneficiary_id: str, relationship_id: str) -> str:
    """SET of the authorization ids holding money on one quota (written by the scripts as
    prefix .. ':qh:' .. relationship id)."""
    return f"{prefix(beneficiary_id)}:qh:{relationship_id}"


def quota_index(beneficiary_id: str) -> str:
    """ZSET of the beneficiary's active relationship ids, scored by funding order."""
    return f"{prefix(beneficiary_id)}:quotas:{beneficiary_id}"


def authorization(authorization_id: str) -> str:
    """HASH of one authorization (see lua/authorize.lua for its fields)."""
    return f"{prefix_of_authorization(authorization_id)}:a:{authorization_id}"


def expiry(prefix_text: str) -> str:
    """ZSET of open holds in this slot, scored by expiry time in ms."""
    return f"{prefix_text}:expiry"


def capturing(prefix_text: str) -> str:
    """ZSET of this slot's authorizations CAPTURING (between a capture's phases, or a one-step
    payment not finished), scored by when the claim began in ms; and of the holds a rebuild put
    back (PENDING, rs = 1), scored by the rebuild's time in ms, until the sweeper settled each
    as SQL says (a capture claimed in the Redis that was lost may have committed since)."""
    return f"{prefix_text}:capturing"


# The sweeper's indexes, kept by Python beside the scripts (a script only touches the keys of
# one slot, for Redis Cluster, so these live in a slot of their own). Members are slot prefixes.
DUE_HOLDS = "mw:{sweep}:due"
"""ZSET: slot prefix -> a time (ms) by which the sweeper must look at the slot's expiry zset;
never later than the slot's earliest open hold."""
CAPTURES_BEGUN = "mw:{sweep}:capturing"
"""ZSET: slot prefix -> the earliest time (ms) a capture of the slot may have begun and not
finished (or a rebuild put a hold of it back); the sweeper looks at the slot once that is
STALE_CAPTURE_SECONDS ago."""


def idempotency(beneficiary_id: str, merchant_id: str, key: str) -> str:
    """HASH: the first answer to (merchant, key) for this beneficiary."""
    return f"{prefix(beneficiary_id)}:i:{merchant_id}:{key}"


def idempotency_claim(merchant_id: str, key: str) -> str:
    """STRING "<request digest>|<created ms>": which request first used a merchant's key.

    Idempotency keys are unique per merchant, but a decision lives in its beneficiary's slot.
    This key, in a slot of its own derived from (merchant, key), catches the same key reused for
    another beneficiary; it is written in the same round trip as the decision."""
    digest = hashlib.sha1(f"{merchant_id}|{key}".encode()).hexdigest()[:TAG_LENGTH]
    return f"mw:{{k:{digest}}}:k:{merchant_id}:{key}"


def rate_limit(principal_key: str) -> tuple[str, str]:
    """The per-principal limits' keys (lua/rate_limit.lua), not hot state: HASH the token bucket
    (t tokens, ts ms) and ZSET the calls in flight (call id -> ms it is forgotten), both under
    the principal's own hash tag {rl:<principal>}."""
    tag = "{rl:" + principal_key + "}"
    return f"{tag}:rate", f"{tag}:in_flight"


# --- the hot state's generation (storage/redis/generation.py) ------------------------------
GENERATION = "mw:{generation}"
"""STRING: "<generation>|<run id>" once Redis holds the whole hot state rebuilt from SQL (the
generation a random token, the run id that of the Redis process it was rebuilt in);
"REBUILDING|<generation>" while a rebuild runs; missing when Redis lost everything."""
REBUILD_LOCK = "mw:{generation}:rebuild"
"""STRING with an expiry: the token of the one server rebuilding the hot state."""
RECONCILE_TURN = "mw:{reconcile}:turn"
"""STRING with an expiry (the rolling reconcile's page interval): the token of the server whose
turn it is to reconcile a page (runtime/rolling_reconcile.py); not hot state."""
RECONCILE_CURSOR = "mw:{reconcile}:cursor"
"""STRING: the relationship id after which the rolling reconcile's next page begins ("" or
missing: from the first); not hot state (lost with Redis, the next pass starts over)."""
RECONCILE_DISSOLVED_CURSOR = "mw:{reconcile}:dissolved"
"""STRING: "<dissolved_at ISO 8601>|<relationship id>" of the last dissolution the rolling
reconcile made sure Redis has (runtime/reconcile_dissolved.py); missing: from the first one.
Deleted with the hot state by a rebuild, which sets it again at its own start."""


def generation_marker(prefix_text: str) -> str:
    """STRING: the generation this slot's keys belong to. Every script checks it first
    (lua/_generation.lua), so no decision is made on a slot Redis lost or that a rebuild has
    not finished."""
    return f"{prefix_text}:g"


# --- what the Lua scripts build from a slot prefix ------------------------------------------
SCRIPT_SUFFIXES: dict[str, str] = {
    ":q:": "quota (prefix .. ':q:' .. relationship id)",
    ":qh:": "quota_holds (prefix .. ':qh:' .. relationship id)",
    ":a:": "authorization (prefix .. ':a:' .. authorization id; also parsed back: ':a:(.+)$')",
    ":expiry": "expiry (prefix .. ':expiry')",
    ":capturing": "capturing (prefix .. ':capturing')",
    ":g": "generation_marker (lua/_generation.lua: the prefix matched in KEYS[1] .. ':g')",
}
"""Key suffixes a script may append to a slot prefix, and the Python builder of that key."""
SLOT_PREFIX_LUA_PATTERN = "^(mw:{b:%x+})"
"""How lua/_generation.lua finds the slot prefix in its first key (a Lua pattern)."""


# --- SCAN patterns (every primary: storage/redis/scans.py) ----------------------------------
ALL_KEYS = "mw:*"
"""Every key of the service's hot state (and its generation, which a rebuild keeps)."""
GENERATION_MARKS = "mw:{b:*}:g"
"""Every slot's generation mark (deleted first by a rebuild)."""
IDEMPOTENCY_RECORDS = "mw:{b:*}:i:*"
"""Every Authorize idempotency record (retention purges the closed months')."""
IDEMPOTENCY_CLAIMS = "mw:{k:*}:k:*"
"""Every merchant-wide idempotency claim."""
AUTHORIZATIONS = "mw:{b:*}:a:*"
"""Every authorization hash (retention drops the closed months' settled ones)."""
SLOT_ZSETS = "mw:{b:*}:[ec][xa]p[it]*"
"""Every slot's expiry and capturing zsets (the sweeper's safety net). The glob also lets
through the rare quota index whose beneficiary id has such a tail: match each key found with
SLOT_ZSET."""
SLOT_ZSET = re.compile(r"(mw:\{b:[0-9a-f]+\}):(expiry|capturing)")
"""A slot zset's name: group 1 its slot prefix, group 2 its kind (expiry, capturing)."""


def slot_zsets_of_kind(kind: str) -> str:
    """Every slot's `kind` zset (expiry or capturing): a SCAN pattern."""
    return f"mw:{{b:*}}:{kind}"


# --- witnesses: one key per Redis Cluster hash slot (storage/redis/generation.py) -----------
HASH_SLOTS = 16384
# The tags' characters: no braces (a hash tag ends at the first '}') and no ':' (no witness tag
# can equal another key's, "b:<hex>", "k:<hex>", "sweep", "generation").
_WITNESS_ALPHABET = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@functools.cache
def _witness_tags() -> tuple[str, ...]:
    """For each hash slot, the first string (shortest first, then in alphabet order) whose slot
    it is: at most 3 characters cover all 16384. Computed once, lazily: ~30 ms (the CRC is
    binascii's, in C), so it is not shipped as a generated table."""
    tags: list[str | None] = [None] * HASH_SLOTS
    left = HASH_SLOTS
    for length in itertools.count(1):
        for characters in itertools.product(_WITNESS_ALPHABET, repeat=length):
            tag = bytes(characters)
            slot = key_slot(tag)
            if tags[slot] is None:
                tags[slot] = tag.decode()
                left -= 1
                if not left:
                    return tuple(tag for tag in tags if tag is not None)
    raise AssertionError("unreachable")  # pragma: no cover


def slot(key: str) -> int:
    """The Redis Cluster hash slot of a key (its hash tag's), on a single node as well."""
    return int(key_slot(key.encode()))


def witness(hash_slot: int) -> str:
    """STRING: the generation of the rebuild that wrote this hash slot in full, on the node that
    serves the slot. A slot whose generation marker is missing is "never used" (resolve marks
    it) only while its witness names the current generation: a node that lost its data lost
    the witness with it, even where keys.GENERATION lives on another node of a Redis Cluster
    and still looks complete (storage/redis/generation.py).

    A rebuild (runtime/rebuild.py) writes all 16384 twice: "REBUILDING|<generation>" once Redis
    is emptied, then, after every page of the hot state, the generation only where that first
    write is still there (SET XX). So a witness that names the generation is younger than every
    key the rebuild wrote to its node (a replica promoted, or a file replayed, with a prefix of
    the node's writes has it only with them all), and older than any loss since the rebuild
    began (a node emptied mid-rebuild has none). 16384 small keys, ~1.4 MB (measured); on one node
    too, where the same logic runs."""
    return f"mw:{{{_witness_tags()[hash_slot]}}}:w"
