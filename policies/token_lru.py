"""Token-granularity LRU and its offline bound, over the whole cache.

The unit of recency and eviction is a token's KV record in one layer (all the lines it spans;
a hit on it refreshes the whole token); all other traffic is cached per line. Fully
associative, capacity in bytes (a token occupies the whole lines it spans). ``token-lru``
with ``sets=N`` is the set-associative variant: N LRU sets of capacity/N bytes each, a token
(or line) placed in the set its hashed address picks.
"""

from dsacache.policies.base import Param, PolicyType, register

_APPENDS = Param("appends", "choice", "yes", "new-token KV writes enter the cache", ("yes", "no"))

TOKEN_LRU = register(
    PolicyType(
        name="token-lru",
        description="LRU whose unit is a token's KV (other traffic per line); fully associative "
        "or in hashed sets",
        params=(
            _APPENDS,
            Param("sets", "int", 0, "0: fully associative; N: N hashed sets", low=0),
        ),
        engine="tokens",
    )
)

TOKEN_BELADY = register(
    PolicyType(
        name="token-belady",
        description="offline optimum at token granularity: evicts the object used furthest ahead",
        params=(_APPENDS,),
        engine="tokens",
        needs_future=True,
    )
)
