"""Sharded KV placement against a brute-force per-token loop."""

import itertools

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from dsacache.cli import main
from dsacache.errors import DsacacheError
from dsacache.simulator.placement import Placement, parse_placement, place
from dsacache.tracer import SynthConfig, synthesize
from dsacache.traces import MAIN_TRACE, bundled, bundled_path, open_trace

M64 = (1 << 64) - 1


def ref_hash(request: int, unit: int, seed: int) -> int:
    """splitmix64-style mix in Python integers (independent of the numpy version)."""
    x = (unit * 0x9E3779B97F4A7C15 + request * 0xC2B2AE3D27D4EB4F + seed * 0x165667B19E3779F9) & M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_owner(p: Placement, request: int, token: int, length: int) -> int:
    owners = p.gpus * p.nodes
    unit = token if p.unit == "tokens" else token // p.page_tokens
    if p.scheme == "rr":
        return unit % owners
    if p.scheme == "hash":
        return ref_hash(request, unit, p.seed) % owners
    length = p.length or length
    last = max(length - 1, 0)
    units = (last if p.unit == "tokens" else last // p.page_tokens) + 1
    per = -(-units // owners)
    return min(unit // per, owners - 1)


def ref_place(trace, p: Placement):
    """Per row: counts per owner, distinct pages per owner, home (plain Python loops)."""
    rows = trace.read_all()
    lengths = {}
    for i in range(len(rows)):
        r = int(rows.request[i])
        lengths[r] = max(lengths.get(r, 0), int(rows.position[i]))
    out = {}
    owners = p.gpus * p.nodes
    for i in range(len(rows)):
        r, pos = int(rows.request[i]), int(rows.position[i])
        counts = [0] * owners
        pages = [set() for _ in range(owners)]
        for t in rows.row(i).tolist():
            o = ref_owner(p, r, t, lengths[r])
            counts[o] += 1
            pages[o].add(t // p.page_tokens)
        if p.home == "request":
            home = r % owners
        elif p.home == "first":
            home = 0
        else:
            home = ref_owner(p, r, max(pos - 1, 0), lengths[r])
        key = (int(rows.step[i]), int(rows.layer[i]), r, int(rows.group[i]))
        out[key] = (counts, [len(s) for s in pages], home)
    return out


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    cfg = SynthConfig(layers=2, groups=1, requests=3, context=700, steps=4, k=48, seed=5)
    return open_trace(synthesize(cfg, tmp_path_factory.mktemp("pl") / "t.dsatrace"))


SPECS = [
    "pages:rr",
    "tokens:rr",
    "pages:hash,seed=3",
    "tokens:hash",
    "pages:contiguous",
    "tokens:contiguous,home=last",
    "pages:contiguous,length=512,home=first",
    "pages:rr,page_tokens=16,home=last",
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(("gpus", "nodes"), [(2, 1), (4, 2), (3, 1)])
def test_counts_match_brute_force(trace, spec, gpus, nodes):
    p = parse_placement(spec, gpus, nodes)
    pc = place(trace, p)
    ref = ref_place(trace, p)
    assert len(pc) == len(ref)
    for i in range(len(pc)):
        key = (int(pc.step[i]), int(pc.layer[i]), int(pc.request[i]), int(pc.group[i]))
        counts, pages, home = ref[key]
        assert pc.counts[i].tolist() == counts, (spec, key)
        assert pc.pages[i].tolist() == pages, (spec, key)
        assert int(pc.home[i]) == home, (spec, key)
    # every selected token is somewhere; fetch moves exactly the non-home ones
    assert (pc.counts.sum(axis=1) == 48).all()
    remote = pc.counts.sum(axis=1) - pc.counts[np.arange(len(pc)), pc.home]
    assert (pc.fetch_bytes.sum(axis=1) == remote * pc.bytes_per_token).all()


def test_links_and_per_step(trace):
    p = parse_placement("tokens:rr", 4, 2)
    # owner o is GPU o % 4 of node o // 4
    assert p.link(0, np.arange(8)).tolist() == [0, 1, 1, 1, 2, 2, 2, 2]
    assert p.link(5, np.array([5, 4, 7, 3])).tolist() == [0, 1, 1, 2]
    pc = place(trace, p)
    steps = pc.per_step()
    assert len(steps) == 4
    assert (steps["tokens"] == 2 * 3 * 48).all()  # layers x requests x k
    parts = steps["local_tokens"] + steps["intra_tokens"] + steps["inter_tokens"]
    assert (parts == steps["tokens"]).all()
    # round-robin tokens over 8 owners: 1 local, 3 intra, 4 inter owners -> about 1:3:4
    t = pc.totals()
    assert abs(t["inter_pct"] - 50) < 10 and abs(t["local_pct"] - 12.5) < 8
    assert steps["imbalance"].between(1, 8).all()
    assert p.owners == 8 and "tokens:rr" in p.spec
    one = place(trace, parse_placement("pages:hash", 1, 1))
    assert one.totals()["local_pct"] == 100 and one.fetch_bytes.sum() == 0


def test_hash_spreads_evenly():
    p = parse_placement("tokens:hash,seed=9", 8, 1)
    owners = p.owner(np.zeros(80_000, np.int64), np.arange(80_000), np.full(80_000, 80_000))
    counts = np.bincount(owners.astype(np.int64), minlength=8)
    assert counts.min() > 9_500 and counts.max() < 10_500


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("bogus", "bogus"),
        ("pages:zigzag", "zigzag"),
        ("pages:rr,page_tokens=0", "page_tokens"),
        ("pages:rr,seed=x", "seed"),
        ("pages:rr,colour=red", "colour"),
        ("pages:rr,home=middle", "middle"),
    ],
)
def test_bad_placements(spec, needle):
    with pytest.raises(DsacacheError, match=needle):
        parse_placement(spec, 2, 1)


def test_combinations_roundtrip_spec():
    for unit, scheme, home in itertools.product(("tokens", "pages"), ("rr", "hash"), ("first",)):
        p = parse_placement(f"{unit}:{scheme},home={home}", 2, 2)
        assert parse_placement(p.spec, 2, 2) == p


@pytest.mark.skipif(MAIN_TRACE not in bundled(), reason="no bundled trace")
def test_cli_place_on_bundled_trace(tmp_path):
    path = bundled_path(MAIN_TRACE)
    runner = CliRunner()
    out = tmp_path / "p.csv"
    args = ["place", str(path), "--gpus", "4", "--nodes", "2", "--requests", "1"]
    result = runner.invoke(main, [*args, "--out", str(out), "--rows", "4"])
    assert result.exit_code == 0, result.output
    assert "on another node" in result.output
    saved = pd.read_csv(out)
    pc = place(open_trace(path), parse_placement("pages:rr", 4, 2), requests=1)
    assert saved["tokens"].sum() == pc.counts.sum()
    assert set(saved["link"]) <= {"local", "intra", "inter"}
    inter = saved[saved["link"] == "inter"]
    assert ((inter["owner"] // 4) != (inter["home"] // 4)).all()
    assert saved["fetch_bytes"].sum() == pc.fetch_bytes.sum()
    result = runner.invoke(main, ["place", str(path), "--placement", "pages:nope"])
    assert result.exit_code == 2 and "nope" in result.output
    result = runner.invoke(main, ["place", str(path), "--gpus", "0"])
    assert result.exit_code == 2 and "--gpus" in result.output
    for requests in ("0", "999"):  # 999 was accepted, 0 failed without naming the value
        result = runner.invoke(main, ["place", str(path), "--requests", requests])
        assert result.exit_code == 2, result.output
        assert f"requests {requests} must be between 1 and the trace's" in result.output
