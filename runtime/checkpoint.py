"""Read an annotated checkpoint directory (or Hub id): config, `wina` section and tensors, safetensors only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from wina.errors import WinaError
from wina.format import CONFIG_SECTION, FORMAT_VERSION

CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "README.md"]


@dataclass
class Checkpoint:
    path: Path
    hf_config: object
    wina: dict
    files: list[Path]

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        out[k] = h.get_tensor(k)
            except Exception as e:
                raise WinaError(f"{f}: corrupt safetensors file ({str(e).splitlines()[0]})") from None
        return out


def resolve(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; anything else is fetched (or found in the cache) as a Hub repo id."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    s = str(path_or_id)
    if path.exists() or s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise WinaError(f"checkpoint directory not found: {s}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(s, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise WinaError(f"cannot fetch {s!r} from the Hugging Face Hub: {type(e).__name__}: {msg}") from None


def open_checkpoint(path_or_id: str | Path, revision: str | None = None) -> Checkpoint:
    path = resolve(path_or_id, revision)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise WinaError(f"{path}: no config.json, not a wina checkpoint")
    section = json.loads(config_path.read_text()).get(CONFIG_SECTION)
    if not isinstance(section, dict):
        raise WinaError(f"{path}: config.json has no '{CONFIG_SECTION}' section; convert the model with wina-convert")
    version = section.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WinaError(f"{path}: wina format version {version} is newer than this runtime reads ({FORMAT_VERSION})")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = [path / "model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise WinaError(f"{path}: missing weight file(s) {', '.join(missing)}")
    return Checkpoint(path=path, hf_config=AutoConfig.from_pretrained(path), wina=section, files=files)
