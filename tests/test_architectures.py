"""Every supported family, as tiny random transformers models: the runtime's dense logits equal transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import wina
from wina.convert.converter import ConvertOptions, convert

from .tiny import FAMILIES, make_tiny

TINY_CALIBRATION = dict(calibration_samples=4, calibration_seq_len=64)


@pytest.fixture(scope="module")
def text_ids(wiki_text, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok(wiki_text[:4000], return_tensors="pt", add_special_tokens=False).input_ids[:, :96]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_logits_and_generation_match_transformers(family, tmp_path, tokenizer_dir, c4_path, text_ids):
    src = make_tiny(family, tmp_path / "src", tokenizer_dir)
    ckpt = convert(str(src), tmp_path / "ckpt", ConvertOptions(calibration_data=str(c4_path), **TINY_CALIBRATION))
    model = wina.load(ckpt, sparsity=0.0)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(text_ids).logits
    got = model(text_ids)
    assert (got - expected).abs().max().item() <= 1e-4

    prompt = text_ids[:, :20]  # 20 prompt + 24 new tokens cross Mistral's 16-token window inside the KV cache
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=24, eos_token_id=None), want)


def test_sparse_linear_inputs_follow_the_threshold(tmp_path, tokenizer_dir, c4_path, text_ids):
    """At 50 % the sparse forward differs from dense, and every linear drops channels (paper mode)."""
    src = make_tiny("qwen3", tmp_path / "src", tokenizer_dir)
    ckpt = convert(str(src), tmp_path / "ckpt", ConvertOptions(calibration_data=str(c4_path), **TINY_CALIBRATION))
    model = wina.load(ckpt, sparsity=0.5, mode="paper")
    with model.measure_sparsity() as meter:
        sparse = model(text_ids)
    model.set_sparsity(0.0)
    assert (sparse - model(text_ids)).abs().max() > 1e-3
    assert len(meter.by_matrix()) == 2 * 7
    assert all(0.2 < f < 0.8 for f in meter.by_matrix().values())


def test_conversion_is_deterministic(tmp_path, tokenizer_dir, c4_path):
    src = make_tiny("llama", tmp_path / "src", tokenizer_dir)
    outs = [
        convert(str(src), tmp_path / f"ckpt{i}", ConvertOptions(calibration_data=str(c4_path), seed=3, **TINY_CALIBRATION))
        for i in range(2)
    ]
    for name in ("model.safetensors", "config.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
