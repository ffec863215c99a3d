"""Source model -> annotated safetensors checkpoint, one decoder layer at a time.

Calibration hidden states are carried from layer to layer: each block is built from the (transformed) source
weights, run densely on the calibration batch while the inputs of its linears are captured, tabulated (dense and
sparse-aware quantile tables), optionally searched for a greedy allocation, and written out. Only one block's
weights and activations are live at a time.
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
    threshold_at,
)
from wina.calibration.allocation import allocation_grid, greedy_allocation
from wina.errors import WinaError
from wina.format import (
    ALLOCATION_LEVELS_KEY,
    ALLOCATIONS,
    CONFIG_SECTION,
    FORMAT_VERSION,
    LEVELS_KEY,
    METHODS,
    SPARSE_CALIBRATION_LEVELS,
    SPARSE_LEVELS_KEY,
    TRANSFORMS,
    allocation_key,
    check_sparsity,
    col_norm_key,
    quantiles_key,
    sparse_quantiles_key,
)
from wina.runtime.config import DecoderConfig
from wina.runtime.model import (
    Block,
    Rotary,
    bias_flags,
    block_tensor_names,
    global_tensor_names,
    shortcut_tensor_names,
)
from wina.runtime.wina_model import paper_mask

from .source import Source, open_source
from .transform import make_transform
from .writer import ShardWriter, staging_dir

# Calibration sequences that also run sparse (per method and sparsity) for the sparse-aware tables.
SPARSE_CALIBRATION_SAMPLES = 16
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
    transform: str = "none"  # orthogonal transform of the weights (convert/transform.py)
    allocation: str = "uniform"  # "greedy": per-matrix sparsity search (calibration/allocation.py), for `method`
    allocation_samples: int = 4  # greedy search: calibration sequences it measures the block error on ...
    allocation_seq_len: int = 64  # ... and their first tokens
    allocation_step: float = 0.01  # greedy search: block sparsity added per step

    def validate(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise WinaError(f"unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if not 0 < self.allocation_step <= 0.1:
            raise WinaError(f"allocation step {self.allocation_step} is out of range: choose a value in (0, 0.1]")
        if self.method not in METHODS:
            raise WinaError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        check_sparsity(self.sparsity)
        if self.transform not in TRANSFORMS:
            raise WinaError(f"unknown transform {self.transform!r}: choose one of {', '.join(TRANSFORMS)}")
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
    dtype = _output_dtype(source, opts)
    # The transform hands out every tensor as the checkpoint will hold it (rounded to the output dtype).
    transform = make_transform(opts.transform, source, DecoderConfig.from_hf(source.config), dtype)
    cfg = transform.config
    dev = torch.device(opts.device)
    writer = ShardWriter(tmp)
    bias = bias_flags(cfg, lambda n: n in source.names)

    tensors = transform.globals()
    for name in global_tensor_names(cfg).values():
        writer.add(name, tensors[name])
    embed = tensors[cfg.arch.embed].to(dev, torch.float32)
    hidden = embed[tokens.to(dev)]
    del embed, tensors
    rotary = Rotary(cfg).to(dev)
    cos, sin = rotary(torch.arange(tokens.shape[1], device=dev), torch.float32)

    levels = sparsity_levels()
    # One hidden-state stream per (method, sparsity) of the sparse-aware tables, carried from layer to layer.
    sparse_streams = {(m, g): hidden[:SPARSE_CALIBRATION_SAMPLES].clone()
                      for m in METHODS for g in SPARSE_CALIBRATION_LEVELS}
    writer.add(LEVELS_KEY, levels)
    writer.add(SPARSE_LEVELS_KEY, torch.tensor(SPARSE_CALIBRATION_LEVELS, dtype=torch.float32))
    for i in tqdm(range(cfg.num_layers), desc="calibrating layers", unit="layer"):
        block = Block(cfg, i, bias).to(dev)
        params = dict(block.named_parameters())
        tensors = transform.layer(i)
        for path, name in block_tensor_names(cfg, i).items():
            if path in params:
                t = tensors[name]
                writer.add(name, t)
                params[path].data = t.to(dev, torch.float32)
        for path, name in shortcut_tensor_names(cfg, i).items():
            if name in tensors:
                writer.add(name, tensors[name])
                setattr(block, path, torch.nn.Parameter(tensors[name].to(dev, torch.float32), requires_grad=False))
        del tensors
        greedy = opts.allocation == "greedy"
        x_alloc = hidden[: opts.allocation_samples, : opts.allocation_seq_len].clone() if greedy else None
        inputs, hidden = _run_block(block, hidden, cos, sin, opts.batch_size)
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + i)
        for group, shorts in INPUT_GROUPS.items():
            teal: dict[int, torch.Tensor] = {}
            for short in shorts:
                key = cfg.arch.linear_key(i, short)
                weight = block.linears()[short].weight
                # A narrowed weight (svd k_proj) reads only the first in_features input channels: score only those.
                x = inputs[group]
                x = x if weight.shape[1] == x.shape[-1] else x[:, : weight.shape[1]]
                if weight.shape[1] not in teal:
                    teal[weight.shape[1]] = score_quantiles(x, None, gen)
                norms = column_norms(weight)
                writer.add(col_norm_key(key), norms)
                writer.add(quantiles_key(key, "teal"), teal[weight.shape[1]].clone())
                writer.add(quantiles_key(key, "wina"), score_quantiles(x, norms.to(x.device), gen))
        norms = {short: writer.get(col_norm_key(cfg.arch.linear_key(i, short))) for short in block.linears()}
        tables = _sparse_aware_tables(block, sparse_streams, cos, sin, norms, levels, gen)
        for (short, method), table in tables.items():
            writer.add(sparse_quantiles_key(cfg.arch.linear_key(i, short), method), table)
        if x_alloc is not None:
            _add_allocation(writer, block, x_alloc, cos, sin, levels, cfg, i, opts)
        del inputs, block
    writer.close()
    _write_metadata(source, cfg, opts, tokens, dtype, tmp)


def _add_allocation(writer, block, x, cos, sin, levels, cfg, i: int, opts: ConvertOptions) -> None:
    """Greedy per-matrix allocation of layer `i` for the checkpoint's method, from the tables just written."""
    if i == 0:
        writer.add(ALLOCATION_LEVELS_KEY, allocation_grid())
    shorts = list(block.linears())
    keys = {s: cfg.arch.linear_key(i, s) for s in shorts}
    table, stats = greedy_allocation(
        block,
        x,
        cos[: x.shape[1]],
        sin[: x.shape[1]],
        {s: writer.get(quantiles_key(k, opts.method)) for s, k in keys.items()},
        levels,
        opts.method,
        {s: writer.get(col_norm_key(k)) for s, k in keys.items()},
        step=opts.allocation_step,
        desc=f"greedy allocation, layer {i}",
    )
    writer.add(allocation_key(cfg.arch.layer_prefix.format(i=i), opts.method), table)
    tqdm.write(f"layer {i}: greedy allocation, {stats.steps} steps, {stats.evaluations} block forwards, "
               f"{stats.seconds:.1f} s ({stats.cpu_seconds:.1f} s CPU)")


@torch.no_grad()
def _sparse_aware_tables(
    block: Block,
    streams: dict[tuple[str, float], torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    norms: dict[str, torch.Tensor],
    levels: torch.Tensor,
    gen: torch.Generator,
) -> dict[tuple[str, str], torch.Tensor]:
    """Quantile tables of every linear's input while the model runs sparse, per (method, uniform sparsity g).

    Thresholds calibrated on the dense model drift once earlier matrices drop channels: down reads
    silu(gate)·up computed from sparse inputs, o reads attention over values from a residual stream that every
    earlier sparse layer perturbed, and measured sparsity overshoots or undershoots the target. Here each
    (method, g) has its own hidden-state stream that has run through every earlier layer sparse at g
    (`streams`, updated in place to this block's output); a pre-hook on each input group tabulates that group's
    input and sets its thresholds just before it runs, so each table is measured in the state it serves.
    As at run time (dense prefill, or the papers' dense first 1 %), the first tokens of each sequence stay dense
    and are left out of the tables: most heads attend mostly to them, so o's input depends on them being dense.
    Returns (short name, method) -> [len(levels g), N_LEVELS].
    """
    linears = block.linears()
    rows: dict[tuple[str, str], list[torch.Tensor]] = {(s, m): [] for s in linears for m in METHODS}
    for short, lin in linears.items():
        lin.col_norm = norms[short].to(lin.weight.device)
    pos = torch.arange(cos.shape[0], device=cos.device)
    for method, g in ((m, g) for m in METHODS for g in SPARSE_CALIBRATION_LEVELS):
        sparse = paper_mask(*streams[(method, g)].shape[:2], cos.device)

        def tabulate(module, args, shorts):
            flat = args[0][sparse]
            for short in shorts:
                lin = linears[short]
                xin = flat[:, : lin.weight.shape[1]]  # a narrowed k_proj reads a prefix of its input
                scale = lin.col_norm if method == "wina" else None
                table = score_quantiles(xin, scale, gen)
                rows[(short, method)].append(table)
                lin.set_threshold(threshold_at(levels, table, g), use_col_norm=method == "wina")

        hooks = [
            linears[shorts[0]].register_forward_pre_hook(lambda mod, args, s=shorts: tabulate(mod, args, s))
            for shorts in INPUT_GROUPS.values()
        ]
        try:
            streams[(method, g)] = block(streams[(method, g)], cos, sin, pos, None, sparse)
        finally:
            for h in hooks:
                h.remove()
    for lin in linears.values():
        lin.set_threshold(0.0, use_col_norm=True)
    return {key: torch.stack(tables) for key, tables in rows.items()}


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
    if not cfg.tie_word_embeddings:  # a rotation unties embeddings (the LM head is rotated differently)
        hf.tie_word_embeddings = False
    hf.save_pretrained(tmp)
    config_path = tmp / "config.json"
    data = json.loads(config_path.read_text())
    data.pop("_name_or_path", None)
    data[CONFIG_SECTION] = {
        "format_version": FORMAT_VERSION,
        "method": opts.method,
        "sparsity": opts.sparsity,
        "allocation": opts.allocation,
        "allocation_methods": [opts.method] if opts.allocation == "greedy" else [],
        "transform": opts.transform,
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
