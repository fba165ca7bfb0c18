"""Predictive reservation admission (issue 13): the aged selection count and admit=frequent
on hand-built DSA-like traces."""

import numpy as np
import pytest

from dsacache.errors import DsacacheError
from dsacache.simulator import replay
from dsacache.simulator.caches import SelectionHistory
from dsacache.traces import TraceWriter, open_trace

MODEL = {"name": "t", "attention": "MLA", "layout": "mla-fp8"}


def test_selection_history_ages_counts_by_hand():
    h = SelectionHistory(decay=0.5)
    assert h.update(np.array([10, 20, 20])).tolist() == [1.0, 1.0, 1.0]
    # step 2: 10 again (0.5 + 1), 30 new; 20 not selected decays to 0.5
    assert h.update(np.array([30, 10])).tolist() == [1.0, 1.5]
    # step 3: 20 comes back (0.25 + 1); 10 not selected (0.75), 30 (0.5)
    assert h.update(np.array([20])).tolist() == [1.25]
    assert dict(zip(h.keys.tolist(), h.counts.tolist(), strict=True)) == {
        10: 0.75, 20: 1.25, 30: 0.5}  # fmt: skip


def test_selection_history_forgets_tokens_that_age_out():
    h = SelectionHistory(decay=0.5)
    h.update(np.array([1]))
    for _ in range(7):  # 0.5**7 < 1/64
        h.update(np.array([2]))
    assert h.keys.tolist() == [2]


def _hot_and_cold(path, steps=6, hot=16, cold=48):
    """One layer; every step selects the same ``hot`` tokens plus ``cold`` never seen again."""
    with TraceWriter(path, model=MODEL, indexer={"kind": "test", "k": hot + cold}) as w:
        for s in range(steps):
            fresh = 1000 + 3 * (s * cold + np.arange(cold))  # apart: no shared lines
            w.append(request=0, step=s, position=5000 + s, layer=0, group=0,
                     indices=np.concatenate([np.arange(hot) * 7, fresh]))  # fmt: skip
    return open_trace(path)


def _kv_hits_by_step(df):
    kv = df[df["class"] == "kv"].groupby(["policy", "step"], observed=True)
    return (kv["sector_hits"].sum() / kv["sectors"].sum()).unstack("step")


def test_frequent_admission_keeps_hot_tokens_that_one_shot_tokens_flush(tmp_path):
    trace = _hot_and_cold(tmp_path / "hc.dsatrace")
    # 32 KiB reserved = 48 fp8 tokens (5 lines each): less than one step's 64, more than the
    # 16 hot ones. Token-LRU admits all 64 and the cold tail evicts the hot head every step.
    policies = ["reserve:ways=1", "reserve:ways=1,admit=frequent", "reserve:ways=1,admit=second"]
    df = replay(trace, policies=policies, cache_size="512KiB", ways=16)
    rates = _kv_hits_by_step(df)
    hot_share = 16 / 64
    assert rates.loc["reserve:ways=1", 1:].max() == 0.0
    # frequent: hot tokens enter at step 1 (selected twice), hit from step 2 on
    assert rates.loc["reserve:ways=1,admit=frequent", 1] == 0.0
    assert np.allclose(rates.loc["reserve:ways=1,admit=frequent", 2:], hot_share)
    # second miss admits the same tokens here (each cold token misses once only)
    assert np.allclose(rates.loc["reserve:ways=1,admit=second", 2:], hot_share)


def test_frequent_admission_differs_from_second_miss_when_selection_pauses(tmp_path):
    # token A is selected at steps 0, 2, 4 (every other step): its aged count reaches
    # 1 + 0.25 = 1.25 < 1.5 at step 2, so admit=frequent keeps it out, while admit=second
    # admits it on its second miss (step 2) and it hits at step 4.
    path = tmp_path / "pause.dsatrace"
    with TraceWriter(path, model=MODEL, indexer={"kind": "test", "k": 1}) as w:
        for s in range(5):
            w.append(request=0, step=s, position=5000 + s, layer=0, group=0,
                     indices=[7] if s % 2 == 0 else [900 + s])  # fmt: skip
    policies = ["reserve:ways=1,admit=frequent", "reserve:ways=1,admit=second"]
    rates = _kv_hits_by_step(replay(open_trace(path), policies=policies, cache_size="512KiB",
                                    ways=16))  # fmt: skip
    assert rates.loc["reserve:ways=1,admit=second", 4] == 1.0
    assert rates.loc["reserve:ways=1,admit=frequent", 4] == 0.0


def test_frequent_admission_parameters_are_checked():
    from dsacache.policies import make_policy

    p = make_policy("reserve:admit=frequent,decay=0.75,threshold=2")
    assert p.values["decay"] == 0.75 and p.values["threshold"] == 2.0
    with pytest.raises(DsacacheError, match=r"decay=1.5 is outside \[0.0, 1.0\]"):
        make_policy("reserve:admit=frequent,decay=1.5")


def _scored_hot_and_cold(path, steps=5, hot=16, cold=48):
    """As ``_hot_and_cold``, with indexer scores: the hot tokens score high, the cold low."""
    with TraceWriter(path, model=MODEL, indexer={"kind": "test", "k": hot + cold}) as w:
        for s in range(steps):
            idx = np.concatenate([np.arange(hot) * 7, 1000 + 3 * (s * cold + np.arange(cold))])
            scores = np.concatenate([np.full(hot, 0.05), np.full(cold, 0.001)])
            order = np.argsort(idx)
            w.append(request=0, step=s, position=5000 + s, layer=0, group=0,
                     indices=idx[order], scores=scores[order])  # fmt: skip
    return open_trace(path)


def test_score_admission_keeps_the_tokens_the_indexer_ranks_high(tmp_path):
    trace = _scored_hot_and_cold(tmp_path / "s.dsatrace")
    policies = ["reserve:ways=1", "reserve:ways=1,admit=score,top=0.25"]
    rates = _kv_hits_by_step(replay(trace, policies=policies, cache_size="512KiB", ways=16))
    assert rates.loc["reserve:ways=1", 1:].max() == 0.0
    # the hot quarter is admitted at its first selection and hits from the next step on
    assert np.allclose(rates.loc["reserve:ways=1,admit=score,top=0.25", 1:], 16 / 64)


def test_score_admission_needs_scores(tmp_path):
    trace = _hot_and_cold(tmp_path / "plain.dsatrace", steps=2)
    with pytest.raises(DsacacheError, match="needs the indexer's scores, and this trace has none"):
        replay(trace, policies=["reserve:ways=1,admit=score"], cache_size="512KiB", ways=16)


def test_top_share_ranks_within_each_layer():
    from dsacache.simulator.caches import top_share

    score = np.array([0.1, 0.5, 0.3, 0.5, 0.9, 0.2, 0.5])
    layer = np.array([0, 0, 0, 0, 1, 1, 0])
    key = np.array([1, 2, 3, 4, 5, 6, 2])  # token 2 read twice
    # layer 0: tokens 2 and 4 tie at the top (2 of 4 tokens score >= 0.5), then 3, then 1
    assert top_share(score, layer, key).tolist() == [1.0, 0.5, 0.75, 0.5, 0.5, 1.0, 0.5]


def test_kv_accesses_carry_the_scores_through_the_stream(tmp_path):
    from dsacache.simulator import Workload
    from dsacache.simulator.stream import build_step, plan_replay
    from dsacache.simulator.workload import CLASS_ID

    trace = _scored_hot_and_cold(tmp_path / "s.dsatrace", steps=1)
    amap = plan_replay(trace, Workload(layout="mla-fp8"))
    chunk = build_step(amap, next(trace.iter_steps()))
    kv = chunk.cls == CLASS_ID["kv"]
    assert np.allclose(np.unique(chunk.score[kv]), [0.001, 0.05], rtol=1e-3)  # float16
    assert np.isnan(chunk.score[~kv]).all()
