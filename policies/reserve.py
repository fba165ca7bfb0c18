"""LLC reservation for KV tokens between decode steps (Levy, arXiv 2603.13430).

Part of the LLC (``bytes``, rounded up to whole ways, or ``ways``) is kept for the selected KV
tokens and managed at token granularity by ``inner``; everything else (indexer keys, weights,
new-token appends unless ``appends=yes``, and KV tokens not admitted) uses the remaining ways
under the line policy ``rest``. ``admit=second`` admits a token on its second miss only (a
ghost list of once-seen tokens, as large as the reservation, remembers first sightings);
``admit=frequent`` keeps an aged count of the steps that selected each token
(``count = decay * count + 1`` when selected) and admits a selected token only once its count
reaches ``threshold``; with the defaults (0.5, 1.5) a token enters when it was selected at
this step and at the previous one (a gap of one step keeps its count below 1.5; a lower
threshold or a slower decay admits such tokens too). Tokens selected once stay out
of the reservation and cannot evict tokens that keep coming back. ``admit=score`` admits the
tokens whose indexer score ranks in the ``top`` share of their layer's selection at this
step (all requests of the step together): a token the indexer scores high now is likely
selected again next step (needs a trace with scores). ``scope=layer`` splits the
reservation evenly into one LRU per layer.

``scope=learned`` is a predictive split (the issue-13 direction): after every decode step it
measures, per layer, the share of selected tokens that the previous step also selected (a
DSA decoder knows both index sets) and its KV footprint, and admits the layers with the
highest reuse, greedily, until their footprint fills the reservation; other layers' KV goes
to the unreserved ways. On a GPU this is one evict_last / persisting flag per layer's KV loads
plus two index sets per layer per step (bits per cached token: 0; state: two floats per layer).
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
                "admit every selected token, on its second miss, when its aged selection count "
                "reaches threshold, or when its indexer score ranks in the top share",
                ("all", "second", "frequent", "score"),
            ),
            Param(
                "decay",
                "float",
                0.5,
                "admit=frequent: ageing of the selection count per step",
                low=0.0,
                high=1.0,
            ),
            Param("threshold", "float", 1.5, "admit=frequent: aged count needed to enter", low=0.0),
            Param(
                "top",
                "float",
                0.5,
                "admit=score: share of each layer's selection admitted, by indexer score",
                low=0.0,
                high=1.0,
            ),
            Param(
                "scope",
                "choice",
                "shared",
                "one reservation for all layers, one per layer, or learned per-layer admission",
                ("shared", "layer", "learned"),
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
                (
                    "lru",
                    "fifo",
                    "random",
                    "plru",
                    "srrip",
                    "brrip",
                    "drrip",
                    "lfu",
                    "s3fifo",
                    "sieve",
                ),
            ),
        ),
        engine="reserve",
    )
)
