"""Source model -> annotated safetensors checkpoint, one decoder layer at a time.

Calibration hidden states are carried from layer to layer: each block is built from the source weights, run
densely on the calibration batch while the inputs of its linears are captured, tabulated, and written out. Only
one block's weights and activations are live at a time, which later per-layer searches (transform, allocation)
reuse.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import wina
from wina.archs import INPUT_GROUPS
from wina.calibration import (
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    DEFAULT_SOURCE,
    calibration_tokens,
    column_norms,
    score_quantiles,
    sparsity_levels,
)
from wina.errors import WinaError
from wina.format import (
    CONFIG_SECTION,
    FORMAT_VERSION,
    LEVELS_KEY,
    METHODS,
    check_sparsity,
    col_norm_key,
    quantiles_key,
)
from wina.runtime.config import DecoderConfig
from wina.runtime.model import Block, Rotary, bias_flags, block_tensor_names, global_tensor_names

from .source import Source, open_source
from .writer import ShardWriter, staging_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConvertOptions:
    method: str = "wina"
    sparsity: float = 0.5
    calibration_data: str = DEFAULT_SOURCE
    calibration_samples: int = DEFAULT_SAMPLES
    calibration_seq_len: int = DEFAULT_SEQ_LEN
    dtype: str = "auto"  # output weight dtype; "auto" keeps the source's
    seed: int = 0
    device: str = "cpu"  # where calibration runs
    batch_size: int = 8  # calibration sequences per forward

    def validate(self) -> None:
        if self.method not in METHODS:
            raise WinaError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        check_sparsity(self.sparsity)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise WinaError(f"unknown dtype {self.dtype!r}: choose auto or one of {', '.join(DTYPES)}")


def convert(model: str, out: str | Path, options: ConvertOptions | None = None, overwrite: bool = False) -> Path:
    """Convert `model` (Hub id, local dir or .gguf) into an annotated checkpoint at `out`; return `out`."""
    opts = options or ConvertOptions()
    opts.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise WinaError(f"output directory {out} already exists (pass --overwrite to replace it)")
    source = open_source(model)
    tokens = calibration_tokens(
        source.tokenizer, opts.calibration_data, opts.calibration_samples, opts.calibration_seq_len, opts.seed
    )
    with staging_dir(out, overwrite) as tmp:
        _write_checkpoint(source, tokens, opts, tmp)
    return out


def _output_dtype(source: Source, opts: ConvertOptions) -> torch.dtype:
    if opts.dtype != "auto":
        return DTYPES[opts.dtype]
    src = getattr(source.config, "dtype", None) or getattr(source.config, "torch_dtype", None)
    if isinstance(src, str):
        src = DTYPES.get(src)
    return src if src in DTYPES.values() else torch.float32


def _write_checkpoint(source: Source, tokens: torch.Tensor, opts: ConvertOptions, tmp: Path) -> None:
    cfg = DecoderConfig.from_hf(source.config)
    dtype = _output_dtype(source, opts)
    dev = torch.device(opts.device)
    writer = ShardWriter(tmp)
    bias = bias_flags(cfg, lambda n: n in source.names)

    def stored(name: str) -> torch.Tensor:
        """The tensor as the checkpoint will hold it (rounded to the output dtype)."""
        return source.get(name).to(dtype)

    for name in global_tensor_names(cfg).values():
        writer.add(name, stored(name))
    embed = stored(cfg.arch.embed).to(dev, torch.float32)
    hidden = embed[tokens.to(dev)]
    del embed
    rotary = Rotary(cfg).to(dev)
    cos, sin = rotary(torch.arange(tokens.shape[1], device=dev), torch.float32)

    levels = sparsity_levels()
    writer.add(LEVELS_KEY, levels)
    for i in tqdm(range(cfg.num_layers), desc="calibrating layers", unit="layer"):
        block = Block(cfg, i, bias).to(dev)
        params = dict(block.named_parameters())
        for path, name in block_tensor_names(cfg, i).items():
            if path in params:
                t = stored(name)
                writer.add(name, t)
                params[path].data = t.to(dev, torch.float32)
        inputs, hidden = _run_block(block, hidden, cos, sin, opts.batch_size)
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + i)
        for group, shorts in INPUT_GROUPS.items():
            x = inputs[group]
            teal = score_quantiles(x, None, gen)
            for short in shorts:
                key = cfg.arch.linear_key(i, short)
                norms = column_norms(block.linears()[short].weight)
                writer.add(col_norm_key(key), norms)
                writer.add(quantiles_key(key, "teal"), teal.clone())
                writer.add(quantiles_key(key, "wina"), score_quantiles(x, norms.to(x.device), gen))
        del inputs, block
    writer.close()
    _write_metadata(source, cfg, opts, tokens, dtype, tmp)


@torch.no_grad()
def _run_block(
    block: Block, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch_size: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Dense forward of one block over the calibration batch; returns captured linear inputs and the output."""
    linears = block.linears()
    captured: dict[str, list[torch.Tensor]] = {g: [] for g in INPUT_GROUPS}
    hooks = [
        linears[shorts[0]].register_forward_pre_hook(
            lambda mod, args, g=group: captured[g].append(args[0].reshape(-1, args[0].shape[-1]).cpu())
        )
        for group, shorts in INPUT_GROUPS.items()
    ]
    pos = torch.arange(hidden.shape[1], device=hidden.device)
    try:
        out = torch.cat([block(h, cos, sin, pos, None, None) for h in hidden.split(batch_size)])
    finally:
        for h in hooks:
            h.remove()
    return {g: torch.cat(v) for g, v in captured.items()}, out


def _write_metadata(
    source: Source, cfg: DecoderConfig, opts: ConvertOptions, tokens: torch.Tensor, dtype: torch.dtype, tmp: Path
) -> None:
    hf = copy.deepcopy(source.config)
    for attr in ("quantization_config",):
        if hasattr(hf, attr):
            delattr(hf, attr)
    hf.architectures = list(getattr(hf, "architectures", None) or cfg.arch.hf_architectures[:1])
    hf.dtype = str(dtype).removeprefix("torch.")
    hf.save_pretrained(tmp)
    config_path = tmp / "config.json"
    data = json.loads(config_path.read_text())
    data.pop("_name_or_path", None)
    data[CONFIG_SECTION] = {
        "format_version": FORMAT_VERSION,
        "method": opts.method,
        "sparsity": opts.sparsity,
        "allocation": "uniform",
        "transform": "none",
        "calibrated_methods": list(METHODS),
        "source_model": source.description,
        "calibration": {
            "source": opts.calibration_data,
            "samples": int(tokens.shape[0]),
            "seq_len": int(tokens.shape[1]),
            "tokens": int(tokens.numel()),
            "seed": opts.seed,
        },
        "wina_version": wina.__version__,
    }
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    source.tokenizer.save_pretrained(tmp)
    if source.generation_config is not None:
        source.generation_config.save_pretrained(tmp)
