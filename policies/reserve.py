"""LLC reservation for KV tokens between decode steps (Levy, arXiv 2603.13430).

Part of the LLC (``bytes``, rounded up to whole ways, or ``ways``) is kept for the selected KV
tokens and managed at token granularity by ``inner``; everything else (indexer keys, weights,
new-token appends unless ``appends=yes``, and KV tokens not admitted) uses the remaining ways
under the line policy ``rest``. ``admit=second`` admits a token on its second miss only (a
ghost list of once-seen tokens, as large as the reservation, remembers first sightings);
``scope=layer`` splits the reservation evenly into one LRU per layer.
"""

from dsacache.policies.base import Param, PolicyType, register

RESERVE = register(
    PolicyType(
        name="reserve",
        description="reserve LLC capacity for KV tokens, token-granularity inner policy",
        params=(
            Param("bytes", "size", 16 * 2**20, "reserved capacity, rounded up to whole ways"),
            Param("ways", "int", 0, "reserved ways per set (overrides bytes when > 0)", low=0),
            Param(
                "inner",
                "choice",
                "token-lru",
                "policy of the reserved region",
                ("token-lru", "token-belady"),
            ),
            Param(
                "admit",
                "choice",
                "all",
                "admit every selected token or on second use",
                ("all", "second"),
            ),
            Param(
                "scope",
                "choice",
                "shared",
                "one reservation for all layers or one per layer",
                ("shared", "layer"),
            ),
            Param(
                "appends",
                "choice",
                "no",
                "new-token KV writes enter the reservation",
                ("yes", "no"),
            ),
            Param(
                "rest",
                "choice",
                "lru",
                "line policy of the unreserved ways",
                ("lru", "fifo", "random"),
            ),
        ),
        engine="reserve",
    )
)
