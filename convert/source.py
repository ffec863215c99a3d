"""Open a model to convert: a Hub id, a local Hugging Face directory (safetensors only) or a .gguf file.

A `Source` exposes the config, tokenizer, generation config and a `get(name)` for tensors, so the converter can
pull one decoder layer at a time (safetensors are memory-mapped; GGUF is dequantized by transformers up front).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig

from wina.archs import ArchSpec, arch_for
from wina.errors import WinaError

# Files worth fetching from a Hub repo: never pickled weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class Source:
    description: str
    config: PretrainedConfig
    arch: ArchSpec
    tokenizer: object
    generation_config: GenerationConfig | None
    _get: Callable[[str], torch.Tensor]
    names: frozenset[str] = field(default_factory=frozenset)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise WinaError(f"{self.description}: tensor {name!r} is missing")
        return self._get(name)

    def maybe(self, name: str) -> torch.Tensor | None:
        return self._get(name) if name in self.names else None


def open_source(model: str, revision: str | None = None) -> Source:
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise WinaError(f"GGUF file not found: {model}")
        return _open_gguf(path)
    if path.is_dir():
        return _open_dir(path, model)
    if path.exists():
        raise WinaError(f"{model} is a file but not a .gguf: pass a Hugging Face model directory, Hub id or .gguf")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise WinaError(f"model path not found: {model}")
    return _open_dir(_download(model, revision), model)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, missing repo, auth: all reported the same way
        msg = str(e).splitlines()[0] if str(e) else ""
        raise WinaError(f"cannot fetch {repo_id!r} from the Hugging Face Hub: {type(e).__name__}: {msg}") from None


def _check_arch(config: PretrainedConfig, description: str) -> ArchSpec:
    try:
        return arch_for(getattr(config, "model_type", None))
    except WinaError as e:
        raise WinaError(f"{description}: {e}") from None


def _open_dir(path: Path, description: str) -> Source:
    if not (path / "config.json").is_file():
        raise WinaError(f"{description}: no config.json, not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        # An unknown model_type fails here; name it rather than transformers' long message.
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        arch_for(model_type)
        raise WinaError(f"{description}: cannot read config.json: {str(e).splitlines()[0]}") from None
    arch = _check_arch(config, description)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise WinaError(
                f"{description}: only pickled weights ({', '.join(pickled)}); wina loads safetensors only, "
                "never unpickles"
            )
        raise WinaError(f"{description}: no *.safetensors weight files")
    from safetensors import safe_open

    handles = {}
    where: dict[str, object] = {}
    for f in files:
        try:
            h = safe_open(str(f), framework="pt")
        except Exception as e:
            raise WinaError(f"{f}: corrupt safetensors file ({str(e).splitlines()[0]})") from None
        handles[f] = h
        for k in h.keys():
            where[k] = h
    return Source(
        description=description,
        config=config,
        arch=arch,
        tokenizer=_tokenizer(path, description),
        generation_config=_generation_config(path),
        _get=lambda name: where[name].get_tensor(name),
        names=frozenset(where),
    )


def _open_gguf(path: Path) -> Source:
    from transformers import AutoModelForCausalLM

    d, f = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(d, gguf_file=f)
    except Exception as e:
        raise WinaError(f"{path}: cannot read GGUF ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    arch = _check_arch(config, str(path))
    # the parsed config goes in: each GGUF parse costs ~7 s on SmolLM2 (its vocabulary is metadata), and the model
    # load would otherwise parse the file once more for it (24.5 -> 16.2 s here)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, config=config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop(arch.lm_head, None)
    return Source(
        description=str(path),
        config=config,
        arch=arch,
        tokenizer=AutoTokenizer.from_pretrained(d, gguf_file=f),
        generation_config=model.generation_config,
        _get=state.__getitem__,
        names=frozenset(state),
    )


def _tokenizer(path: Path, description: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise WinaError(f"{description}: cannot load tokenizer ({type(e).__name__})") from None


def _generation_config(path: Path) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None
