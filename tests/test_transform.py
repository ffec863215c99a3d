"""Orthogonal transforms (convert/transform.py): the transformed dense model computes the original's logits.

Relative error throughout: max|logits_transformed − logits_original| / max|logits_original| over all positions and
vocabulary entries of one fp32 forward (the reference is transformers' own model of the source).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import wina
from wina.convert.converter import ConvertOptions, convert
from wina.convert.transform import offdiag_ratio
from wina.format import shortcut_key

from .tiny import COMMON, FAMILIES, make_tiny

TINY_CALIBRATION = dict(calibration_samples=4, calibration_seq_len=64)
ROTATIONS = ("svd", "shared")
TOL = 1e-4


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def read_tensors(ckpt) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


@pytest.fixture(scope="module")
def text_ids(wiki_text, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tok(wiki_text[:4000], return_tensors="pt", add_special_tokens=False).input_ids[:, :96]


@pytest.mark.parametrize("transform", ROTATIONS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_dense_logits_unchanged(family, transform, tmp_path, tokenizer_dir, c4_path, text_ids):
    src = make_tiny(family, tmp_path / "src", tokenizer_dir)
    opts = ConvertOptions(calibration_data=str(c4_path), transform=transform, **TINY_CALIBRATION)
    ckpt = convert(str(src), tmp_path / "ckpt", opts)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(text_ids).logits
    model = wina.load(ckpt, sparsity=0.0)
    assert rel_err(model(text_ids), want) <= TOL

    config = json.loads((ckpt / "config.json").read_text())
    assert config["wina"]["transform"] == transform
    assert config["tie_word_embeddings"] is False
    t = read_tensors(ckpt)
    assert "lm_head.weight" in t
    n_layers, d = COMMON["num_hidden_layers"], COMMON["hidden_size"]
    shortcuts = [k for k in t if k.endswith("_shortcut.weight")]
    assert all(torch.equal(t[f"model.layers.{i}.input_layernorm.weight"], torch.ones(d)) for i in range(n_layers))
    if transform == "shared":
        # No extra matrices: a standard dense model that transformers itself loads and runs unchanged.
        assert shortcuts == []
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        with torch.no_grad():
            assert rel_err(hf(text_ids).logits, want) <= TOL
    else:
        # Two shortcuts per layer, less the last layer's identity MLP shortcut.
        assert len(shortcuts) == 2 * n_layers - 1
        assert shortcut_key(f"model.layers.{n_layers - 1}.", "mlp") not in t
        head_dim = FAMILIES[family][2].get("head_dim") or d // COMMON["num_attention_heads"]
        kv_dim = COMMON["num_key_value_heads"] * head_dim
        for i in range(n_layers):
            k = t[f"model.layers.{i}.self_attn.k_proj.weight"]
            assert k.shape == (kv_dim, min(kv_dim, d))  # narrowed to its live columns
            assert t[f"model.layers.{i}.self_attn.k_proj.col_norm"].shape == (k.shape[1],)
            assert offdiag_ratio(k) < 1e-5  # column-orthogonal after the SVD rotation
            assert offdiag_ratio(t[f"model.layers.{i}.mlp.gate_proj.weight"]) < 1e-5


def test_svd_generation_and_narrowed_k_sparsity(tmp_path, tokenizer_dir, c4_path, text_ids):
    """KV-cache decoding (sliding window) through shortcuts + narrowed k; k's sparsity counts only live columns."""
    src = make_tiny("mistral", tmp_path / "src", tokenizer_dir)
    opts = ConvertOptions(calibration_data=str(c4_path), transform="svd", **TINY_CALIBRATION)
    model = wina.load(convert(str(src), tmp_path / "ckpt", opts), sparsity=0.0)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    prompt = text_ids[:, :20]
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=24, eos_token_id=None), want)

    model.set_mode("paper")
    model.set_sparsity(0.5)
    with model.measure_sparsity() as meter:
        model(text_ids)
    kv_dim = model.decoder.blocks[0].attn.k.weight.shape[1]
    assert kv_dim < COMMON["hidden_size"]
    sparse_tokens = text_ids.numel() - 1  # paper mode: the first ceil(1 %) token is dense
    assert meter.total["0.k"] == sparse_tokens * kv_dim
    assert all(0.35 < f < 0.65 for f in meter.by_matrix().values())


@pytest.mark.parametrize("transform", ROTATIONS)
def test_smollm2_dense_logits_unchanged(transform, tmp_path, smollm2_dir, c4_path, smollm2_hf, wiki_text):
    opts = ConvertOptions(
        calibration_data=str(c4_path), transform=transform, calibration_samples=4, calibration_seq_len=128
    )
    model = wina.load(convert(str(smollm2_dir), tmp_path / "ckpt", opts), sparsity=0.0)
    ids = model.tokenizer(wiki_text[:4000], return_tensors="pt", add_special_tokens=False).input_ids[:, :128]
    with torch.no_grad():
        want = smollm2_hf(ids).logits
    assert rel_err(model(ids), want) <= TOL
