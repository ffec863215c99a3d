"""Greedy per-matrix allocation: the search, its tables in the checkpoint, and the runtime's use of them."""

from __future__ import annotations

import json

import pytest
import torch

import wina
from wina.archs import LINEARS
from wina.calibration.allocation import allocation_grid, matrix_sparsities
from wina.convert.converter import ConvertOptions, convert
from wina.errors import WinaError
from wina.format import ALLOCATION_LEVELS_KEY, allocation_key
from wina.runtime.checkpoint import open_checkpoint
from wina.runtime.evaluate import perplexity, summarize_sparsity

from .tiny import make_tiny

TINY_CALIBRATION = dict(calibration_samples=4, calibration_seq_len=64)


def _param_weighted(row: torch.Tensor, params: torch.Tensor) -> float:
    return float((row.double() * params).sum() / params.sum())


@pytest.mark.parametrize("method", ["wina", "teal"])
def test_greedy_tables_are_stored_and_used(method, tmp_path, tokenizer_dir, c4_path, wiki_text):
    src = make_tiny("qwen3", tmp_path / "src", tokenizer_dir)
    opts = ConvertOptions(calibration_data=str(c4_path), method=method, allocation="greedy", **TINY_CALIBRATION)
    ckpt = convert(str(src), tmp_path / "ckpt", opts)
    section = json.loads((ckpt / "config.json").read_text())["wina"]
    assert section["allocation"] == "greedy" and section["allocation_methods"] == [method]

    state = open_checkpoint(ckpt).tensors()
    grid = state[ALLOCATION_LEVELS_KEY]
    assert torch.equal(grid, allocation_grid()) and abs(float(grid[-1]) - 0.95) < 1e-6
    model = wina.load(ckpt, sparsity=0.5, mode="paper")
    other = "teal" if method == "wina" else "wina"
    for i, blk in enumerate(model.decoder.blocks):
        table = state[allocation_key(f"model.layers.{i}.", method)]
        assert allocation_key(f"model.layers.{i}.", other) not in state
        assert table.shape == (grid.numel(), len(LINEARS)) and table.dtype == torch.float32
        assert bool((table[1:] >= table[:-1] - 1e-7).all()), "a matrix never gets denser along the path"
        assert bool((table >= 0).all()) and bool((table <= 0.99 + 1e-6).all())
        params = torch.tensor([float(blk.linears()[s].weight.numel()) for s in LINEARS], dtype=torch.float64)
        # Every row drops exactly its grid fraction of the block's weights (steps are sized from the shapes).
        for j in range(0, grid.numel(), 10):
            assert abs(_param_weighted(table[j], params) - float(grid[j])) < 1e-4

    # The runtime splits a model target over the matrices (not uniformly), layer by layer.
    assert model.allocation == "greedy" and model.method == method
    per = matrix_sparsities(model.allocations[method][0], model.allocation_levels, 0.5)
    assert len(set(round(v, 4) for v in per.values())) > 1
    ids = model.tokenizer(wiki_text[:8000], return_tensors="pt").input_ids[:, :256]
    with model.measure_sparsity() as meter:
        model(ids)
    by = meter.by_matrix()
    assert max(by.values()) - min(by.values()) > 0.05

    # Explicit uniform still works; the other method has no table: uniform by default, an error if asked for.
    model.set_sparsity(0.5, allocation="uniform")
    assert model.allocation == "uniform"
    model.set_sparsity(0.5, other)
    assert model.allocation == "uniform"
    with pytest.raises(WinaError, match="no greedy allocation"):
        model.set_sparsity(0.5, other, allocation="greedy")
    model.set_sparsity(0.0, method)
    assert all(lin.threshold_value == 0 for lin in model.sparse_linears().values())


def test_greedy_search_is_deterministic(tmp_path, tokenizer_dir, c4_path):
    src = make_tiny("llama", tmp_path / "src", tokenizer_dir)
    opts = dict(calibration_data=str(c4_path), allocation="greedy", **TINY_CALIBRATION)
    outs = [convert(str(src), tmp_path / f"ckpt{i}", ConvertOptions(**opts)) for i in range(2)]
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()


def test_unknown_allocation_is_one_line_error():
    with pytest.raises(WinaError, match="unknown allocation"):
        ConvertOptions(allocation="best").validate()


@pytest.fixture(scope="module")
def greedy_model(smollm2_ckpt):
    """The session's SmolLM2 checkpoint (conftest), converted with the greedy allocation for WINA."""
    return wina.load(smollm2_ckpt, mode="paper")


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.4, 0.5])
def test_greedy_measured_sparsity_on_wikitext_matches_target(greedy_model, wiki_text, target):
    """Real SmolLM2, WikiText-2 test text (never calibrated on): parameter-weighted sparsity within 1.5 points."""
    greedy_model.set_sparsity(target, "wina")
    assert greedy_model.allocation == "greedy"
    r = perplexity(greedy_model, wiki_text, seq_len=1024, max_windows=6, spread=True, progress=False)
    assert abs(r["sparsity"] - target) <= 0.015, r["sparsity"]
    assert r["perplexity"] < 60
    by = r["sparsity_by_matrix"]
    assert max(by.values()) - min(by.values()) > 0.05, by  # really per-matrix, not uniform
