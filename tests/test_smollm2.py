"""The real SmolLM2-135M-Instruct, converted once per session, against transformers and on real WikiText-2 text."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import wina
from wina.errors import WinaError
from wina.runtime.evaluate import perplexity
from wina.runtime.wina_model import paper_mask


@pytest.fixture(scope="module")
def model(smollm2_ckpt):
    return wina.load(smollm2_ckpt, sparsity=0.0)


@pytest.fixture(scope="module")
def wiki_ids(model, wiki_text):
    return model.tokenizer(wiki_text[:20000], return_tensors="pt", add_special_tokens=False).input_ids


def test_dense_logits_equal_transformers(model, smollm2_hf, wiki_ids):
    model.set_sparsity(0.0)
    ids = wiki_ids[:, :512]
    with torch.no_grad():
        expected = smollm2_hf(ids).logits
    assert (model(ids) - expected).abs().max().item() <= 1e-4


def test_dense_greedy_generation_equals_transformers(model, smollm2_hf):
    model.set_sparsity(0.0)
    ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want = smollm2_hf.generate(ids, max_new_tokens=16, do_sample=False)
    got = model.generate(ids, max_new_tokens=16)
    assert torch.equal(got, want[:, : got.shape[1]])
    assert "Paris" in model.tokenizer.decode(got[0])


def test_sparse_decode_with_cache_equals_full_forward_reference(model, wiki_ids):
    """KV-cached decode (dense prefill, sparse steps) == a cache-free forward with the same per-token mask."""
    model.set_sparsity(0.5, "wina")
    prompt = wiki_ids[:, :40]
    out = model.generate(prompt, max_new_tokens=8, eos_token_id=None)
    for step in range(8):
        seq = out[:, : 40 + step]
        mask = (torch.arange(seq.shape[1]) >= 40)[None]
        logits = model(seq, sparse=mask)
        assert logits[0, -1].argmax().item() == out[0, 40 + step].item()


@pytest.mark.parametrize("method", ["wina", "teal"])
@pytest.mark.parametrize("target", [0.25, 0.5])
def test_measured_sparsity_on_wikitext_matches_target(model, wiki_text, method, target):
    """Thresholds calibrated on C4 hold on WikiText-2 test text for every matrix type: paper mode, 6 windows x 1024
    spread over the test set (its first windows are one article, whose text sits 1-1.5 points off the rest)."""
    model.set_mode("paper")
    model.set_sparsity(target, method, "uniform")
    result = perplexity(model, wiki_text, seq_len=1024, max_windows=6, spread=True, progress=False)
    model.set_mode("decode")
    assert result["windows"] == 6 and result["spread"]
    assert abs(result["sparsity"] - target) <= 0.015
    assert set(result["sparsity_by_matrix"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    for kind, measured in result["sparsity_by_matrix"].items():
        assert abs(measured - target) <= 0.015, (kind, measured)
    assert math.isfinite(result["perplexity"])


def test_sparsity_hurts_perplexity_gracefully(model, wiki_text):
    model.set_mode("paper")
    ppl = {}
    for s in (0.0, 0.5):
        model.set_sparsity(s, "wina", "uniform")
        ppl[s] = perplexity(model, wiki_text, seq_len=1024, max_windows=2, progress=False)["perplexity"]
    model.set_mode("decode")
    assert ppl[0.0] < ppl[0.5] < 2 * ppl[0.0]
    assert 10 < ppl[0.0] < 40  # SmolLM2's WikiText-2 perplexity is about 21.6 at window 2048


def test_paper_mode_keeps_first_percent_dense():
    mask = paper_mask(2, 2048, "cpu")
    assert mask.shape == (2, 2048)
    assert not mask[:, :21].any() and mask[:, 21:].all()


def test_checkpoint_is_self_describing(smollm2_ckpt, model):
    config = json.loads((smollm2_ckpt / "config.json").read_text())
    section = config["wina"]
    assert section["format_version"] == 1 and section["method"] == "wina" and section["sparsity"] == 0.5
    assert section["calibration"]["tokens"] == section["calibration"]["samples"] * section["calibration"]["seq_len"]
    with safe_open(str(smollm2_ckpt / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["wina_format_version"] == "1"
        w = f.get_tensor("model.layers.7.mlp.down_proj.weight")
        norm = f.get_tensor("model.layers.7.mlp.down_proj.col_norm")
        table = f.get_tensor("model.layers.7.mlp.down_proj.wina_quantiles")
    assert torch.allclose(norm, w.double().norm(dim=0).float())
    assert torch.all(table[1:] >= table[:-1])  # a quantile table is monotone
    for name in ("tokenizer.json", "generation_config.json"):
        assert (smollm2_ckpt / name).is_file()


def test_sparsity_is_chosen_at_load_time(smollm2_ckpt):
    a = wina.load(smollm2_ckpt, sparsity=0.25)
    b = wina.load(smollm2_ckpt, method="teal", mode="paper")
    la, lb = a.sparse_linears()["3.up"], b.sparse_linears()["3.up"]
    assert a.sparsity == 0.25 and a.method == "wina" and a.allocation == "greedy"  # the checkpoint has WINA's table
    assert b.sparsity == 0.5 and b.method == "teal" and b.mode == "paper" and b.allocation == "uniform"
    assert la.use_col_norm and not lb.use_col_norm and lb.threshold_value > 0
    assert any(lin.threshold_value > 0 for lin in a.sparse_linears().values())
    a.set_sparsity(0.25, allocation="uniform")
    assert la.threshold_value > 0
    with pytest.raises(WinaError, match="out of range"):
        a.set_sparsity(0.96)


def test_transformers_still_loads_the_annotated_checkpoint(smollm2_ckpt, smollm2_hf, wiki_ids):
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(smollm2_ckpt, dtype=torch.float32).eval()
    ids = wiki_ids[:, :64]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, smollm2_hf(ids).logits)


def test_fast_path_matches_reference(smollm2_ckpt, wiki_ids):
    """wina.load(fast=True): every sparse linear's fast CPU op gives the reference output at the checkpoint's real
    thresholds, also after a method change (the kernels are refreshed), and generate() runs through it. Whole decode
    runs are not compared exactly: a channel whose score sits at a threshold flips on a last-bit difference of
    summation order and the two paths then drift apart (measured: TEAL, step 6, one channel of layer 2's v)."""
    from wina.runtime.sparse import reference_sparse_linear

    fast = wina.load(smollm2_ckpt, sparsity=0.5, fast=True)
    g = torch.Generator().manual_seed(0)
    for method in ("wina", "teal"):
        fast.set_sparsity(0.5, method)
        for name, lin in fast.sparse_linears().items():
            assert lin.kernel is not None, name
            x = torch.randn(1, 1, lin.in_features, generator=g) * max(lin.threshold_value, 1e-3) * 1.2
            if lin.use_col_norm:
                x = x / lin.col_norm
            want, _ = reference_sparse_linear(x, lin.weight, lin.bias, lin.threshold, lin.score_scale, True)
            got = lin.kernel(lin, x, True)
            if got is not None:  # None: the per-shape timing chose dense, and the reference runs
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{method} {name}")
        out = fast.generate(wiki_ids[:, :32], max_new_tokens=4, eos_token_id=None)
        assert out.shape == (1, 36) and torch.equal(out[:, :32], wiki_ids[:, :32])


def test_cpu_decode_step_matches_plain_path(smollm2_ckpt, wiki_ids):
    """On the CPU, wina.load(fast=True) runs decode tokens through CpuDecodeStep (C++ RMSNorm, rope + cache write +
    attention, silu·mul): dense decode logits of the real model equal the plain block path's to float32 rounding.
    (Sparse whole-decode runs are not compared: threshold flips, see test_fast_path_matches_reference.)"""
    from wina.runtime import cpu_kernels
    from wina.runtime.decode import teacher_forced_logits
    from wina.runtime.kernels import CpuDecodeStep

    if cpu_kernels.load() is None:
        pytest.skip(f"C++ ops not built: {cpu_kernels.failure()}")
    dec = wina.load(smollm2_ckpt, sparsity=0.5, fast=True).decoder
    assert all(isinstance(blk.decode_step, CpuDecodeStep) for blk in dec.blocks)

    got = teacher_forced_logits(dec, wiki_ids[:, :40], 32, sparse=None)
    for blk in dec.blocks:
        blk.decode_step = None
    want = teacher_forced_logits(dec, wiki_ids[:, :40], 32, sparse=None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
