"""The command lines: happy paths on tiny models, and bad input -> one line, non-zero exit, no output left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import wina
from wina.convert.cli import main as convert_cli
from wina.runtime.cli import main as wina_cli

from .conftest import WIKI
from .tiny import make_tiny

SMALL = ["--calibration-samples", "2", "--calibration-seq-len", "64"]


def run(cli, args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2", tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_src, c4_path) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "qwen2-wina"
    code, output = run(convert_cli, [tiny_src, "--out", out, "--calibration-data", c4_path, "--method", "teal", *SMALL])
    assert code == 0, output
    return out


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code != 0
    assert lines and lines[-1].startswith("error: "), output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_eval_json_reports_perplexity_and_sparsity(tiny_ckpt, tmp_path):
    code, output = run(wina_cli, ["eval", tiny_ckpt, "--data", WIKI, "--seq-len", 128, "--max-windows", 2, "--json"])
    assert code == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    assert result["method"] == "teal" and result["mode"] == "paper" and result["target_sparsity"] == 0.5
    assert result["perplexity"] > 1 and 0.3 < result["sparsity"] < 0.7
    assert set(result["sparsity_by_matrix"]) == {"q", "k", "v", "o", "gate", "up", "down"}


def test_generate_prints_a_continuation(tiny_ckpt):
    code, output = run(wina_cli, ["generate", tiny_ckpt, "Hello", "--max-new-tokens", 5, "--raw"])
    assert code == 0 and output.strip(), output


def test_unsupported_architecture(tmp_path, tokenizer_dir, c4_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128)).save_pretrained(src)
    out = tmp_path / "out"
    code, output = run(convert_cli, [src, "--out", out, "--calibration-data", c4_path, *SMALL])
    assert_one_line_error(code, output, "unsupported architecture 'gpt2'", "llama")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_pickled_weights_are_refused(tmp_path, tiny_src, c4_path):
    src = tmp_path / "pickled"
    shutil.copytree(tiny_src, src)
    (src / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, src / "pytorch_model.bin")
    code, output = run(convert_cli, [src, "--out", tmp_path / "out", "--calibration-data", c4_path, *SMALL])
    assert_one_line_error(code, output, "safetensors", "pytorch_model.bin")
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors(tmp_path, tiny_src, c4_path):
    src = tmp_path / "corrupt"
    shutil.copytree(tiny_src, src)
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    code, output = run(convert_cli, [src, "--out", tmp_path / "out", "--calibration-data", c4_path, *SMALL])
    assert_one_line_error(code, output, "corrupt")


def test_missing_model(tmp_path, c4_path):
    code, output = run(convert_cli, [tmp_path / "nowhere", "--out", tmp_path / "out", "--calibration-data", c4_path])
    assert_one_line_error(code, output, "not found")
    code, output = run(convert_cli, [tmp_path / "model.gguf", "--out", tmp_path / "out"])
    assert_one_line_error(code, output, "GGUF file not found")


@pytest.mark.parametrize("sparsity", ["-0.1", "0.96", "1.5"])
def test_sparsity_out_of_range(tmp_path, tiny_src, tiny_ckpt, sparsity):
    code, output = run(convert_cli, [tiny_src, "--out", tmp_path / "out", "--sparsity", sparsity])
    assert_one_line_error(code, output, "out of range")
    assert not (tmp_path / "out").exists()
    code, output = run(wina_cli, ["generate", tiny_ckpt, "Hi", "--sparsity", sparsity])
    assert_one_line_error(code, output, "out of range")


def test_calibration_text_too_short(tmp_path, tiny_src):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.\n\nAnd one more paragraph.")
    code, output = run(convert_cli, [tiny_src, "--out", tmp_path / "out", "--calibration-data", short, *SMALL])
    assert_one_line_error(code, output, "calibration text too short", "need 2 x 64 = 128")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_needs_overwrite(tmp_path, tiny_src, c4_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, output = run(convert_cli, [tiny_src, "--out", out, "--calibration-data", c4_path, *SMALL])
    assert_one_line_error(code, output, "already exists")
    assert (out / "keep.txt").read_text() == "user data"
    code, output = run(convert_cli, [tiny_src, "--out", out, "--calibration-data", c4_path, *SMALL, "--overwrite"])
    assert code == 0, output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_not_a_wina_checkpoint(tiny_src):
    code, output = run(wina_cli, ["generate", tiny_src, "Hi"])
    assert_one_line_error(code, output, "no 'wina' section")


def _fake_hub_cache(cache: Path, repo_id: str, files_from: Path) -> None:
    """The Hugging Face cache layout, as `snapshot_download` leaves it, filled from a local directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(files_from, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_ids_resolve_through_the_hub_cache_offline(tmp_path, monkeypatch, tiny_src, tiny_ckpt, c4_path):
    """Hub code paths run for real against a local cache (the Hub itself is unreachable here)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny-org/tiny-qwen2", tiny_src)
    _fake_hub_cache(cache, "tiny-org/tiny-qwen2-wina", tiny_ckpt)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "from-hub"
    code, output = run(convert_cli, ["tiny-org/tiny-qwen2", "--out", out, "--calibration-data", c4_path, *SMALL])
    assert code == 0, output
    model = wina.load("tiny-org/tiny-qwen2-wina")
    assert model.method == "teal" and model.path.parts[-2] == "snapshots"
    code, output = run(convert_cli, ["tiny-org/absent", "--out", tmp_path / "x"])
    assert_one_line_error(code, output, "cannot fetch 'tiny-org/absent'")


def test_calibration_from_a_datasets_dataset(tmp_path, tiny_src, c4_path):
    """The default calibration source is a `datasets` dataset; a local dataset folder exercises that path."""
    import gzip

    folder = tmp_path / "c4-local"
    folder.mkdir()
    with gzip.open(c4_path, "rt") as f:
        (folder / "validation.jsonl").write_text("".join(next(f) for _ in range(50)))
    out = tmp_path / "out"
    code, output = run(convert_cli, [tiny_src, "--out", out, "--calibration-data", f"{folder}@validation", *SMALL])
    assert code == 0, output
    assert json.loads((out / "config.json").read_text())["wina"]["calibration"]["source"] == f"{folder}@validation"
