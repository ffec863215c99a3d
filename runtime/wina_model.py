"""`WinaModel`: a loaded checkpoint with its tokenizer, a chosen sparsity level, and a sparsity mode.

Modes say which tokens of a forward pass are sparse:
- `decode` (production): prefill dense, every generated token sparse.
- `paper` (the papers' evaluation protocol): all but the first 1 % of the tokens of each forward sparse.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from wina.calibration.thresholds import threshold_for
from wina.errors import WinaError
from wina.calibration.allocation import matrix_sparsities
from wina.format import (
    ALLOCATION_LEVELS_KEY,
    ALLOCATIONS,
    LEVELS_KEY,
    METHODS,
    SPARSE_LEVELS_KEY,
    allocation_key,
    check_sparsity,
    col_norm_key,
    quantiles_key,
    sparse_quantiles_key,
)

from .checkpoint import open_checkpoint
from .config import DecoderConfig
from .model import Decoder, decoder_from_state
from .sparse import SparseLinear, SparseSpec, SparsityMeter

MODES = ("decode", "paper")
PAPER_DENSE_FRACTION = 0.01
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def paper_mask(batch: int, seq: int, device) -> torch.Tensor:
    """Paper protocol: the first ceil(1 %) of positions dense, the rest sparse."""
    dense = math.ceil(PAPER_DENSE_FRACTION * seq)
    return (torch.arange(seq, device=device) >= dense).expand(batch, seq)


class WinaModel(nn.Module):
    """A sparsity-ready decoder. `model(input_ids)` -> logits; `model.generate(...)`; `model.tokenizer`."""

    def __init__(
        self,
        decoder: Decoder,
        tokenizer,
        config: dict,
        levels: torch.Tensor,
        quantiles: dict[str, dict[str, torch.Tensor]],
        path: Path | None = None,
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.wina_config = config
        self.levels = levels
        self.quantiles = quantiles  # linear name ('3.gate') -> method -> quantile table
        self.path = path
        self.mode = "decode"
        self.method = config["method"]
        self.sparsity = 0.0
        self.generation_config = None
        self.table_sparsities = [0.0]  # model sparsity each quantile-table row was measured at (0: dense)
        # Greedy allocation (format: wina.allocation_levels + per-layer `{method}_allocation` tables), if stored:
        self.allocation_levels: torch.Tensor | None = None  # block sparsity grid of the tables' rows
        self.allocations: dict[str, dict[int, torch.Tensor]] = {}  # method -> layer -> [n_levels, 7]
        self.allocation = "uniform"  # allocation in use
        self.fast = False  # fast kernels on sparse decode steps (from_pretrained(fast=True))

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        sparsity: float | None = None,
        method: str | None = None,
        mode: str = "decode",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        fast: bool = False,
    ) -> "WinaModel":
        """Load an annotated checkpoint (directory or Hub id) at `sparsity` (default: the checkpoint's).

        `fast`: sparse decode steps run the fast kernels (runtime/kernels.py: Triton on a GPU, the C++ op on the
        CPU) instead of the reference path; full-sequence forwards (prefill, evaluation) are unaffected.
        """
        ckpt = open_checkpoint(path_or_id, revision)
        cfg = DecoderConfig.from_hf(ckpt.hf_config)
        state = ckpt.tensors()
        device = torch.device(device)
        dtype = _dtype(dtype, ckpt.hf_config)
        decoder = decoder_from_state(cfg, state, device, dtype, str(ckpt.path))
        quantiles: dict[str, dict[str, torch.Tensor]] = {}
        for lname, lin in decoder.sparse_linears().items():
            i, short = lname.split(".")
            key = cfg.arch.linear_key(int(i), short)
            lin.col_norm = state[col_norm_key(key)].to(device, torch.float32)
            lin.threshold = torch.zeros((), device=device)
            quantiles[lname] = {m: state[quantiles_key(key, m)] for m in METHODS if quantiles_key(key, m) in state}
            for m in METHODS:  # sparse-aware tables: rows measured with the model at SPARSE_LEVELS_KEY sparsities
                if sparse_quantiles_key(key, m) in state:
                    quantiles[lname][f"{m}_sparse"] = state[sparse_quantiles_key(key, m)]
        from transformers import AutoTokenizer, GenerationConfig

        model = cls(decoder, AutoTokenizer.from_pretrained(ckpt.path), ckpt.wina, state[LEVELS_KEY], quantiles, ckpt.path)
        if SPARSE_LEVELS_KEY in state:
            model.table_sparsities = [0.0, *state[SPARSE_LEVELS_KEY].tolist()]
        if ALLOCATION_LEVELS_KEY in state:
            model.allocation_levels = state[ALLOCATION_LEVELS_KEY]
            for m in METHODS:
                keys = [allocation_key(cfg.arch.layer_prefix.format(i=i), m) for i in range(cfg.num_layers)]
                if all(k in state for k in keys):
                    model.allocations[m] = {i: state[k] for i, k in enumerate(keys)}
        try:
            model.generation_config = GenerationConfig.from_pretrained(ckpt.path)
        except OSError:
            pass
        model.set_mode(mode)
        model.set_sparsity(ckpt.wina["sparsity"] if sparsity is None else sparsity, method)
        if fast:
            from .kernels import enable_fast_path

            enable_fast_path(model.decoder)
            model.fast = True
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.decoder.embed.weight.device

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise WinaError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode = mode

    def set_sparsity(self, sparsity: float, method: str | None = None, allocation: str | None = None) -> None:
        """Map a target model sparsity to per-matrix thresholds for `method`.

        `allocation`: "uniform" (every matrix at `sparsity`), "greedy" (every layer at parameter-weighted
        `sparsity`, split over its matrices by the checkpoint's greedy table for `method`), or None: greedy where
        the checkpoint has a table for `method`, else uniform.
        """
        sparsity = check_sparsity(sparsity)
        method = method or self.method
        if method not in METHODS:
            raise WinaError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        if allocation is None:
            allocation = "greedy" if method in self.allocations else "uniform"
        if allocation not in ALLOCATIONS:
            raise WinaError(f"unknown allocation {allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if allocation == "greedy" and method not in self.allocations:
            raise WinaError(f"checkpoint has no greedy allocation for {method} (convert with --allocation greedy)")
        per_layer: dict[int, dict[str, float]] = {}
        for name, lin in self.decoder.sparse_linears().items():
            table = self.quantiles[name].get(method)
            if table is None:
                raise WinaError(f"checkpoint has no {method} calibration for {name}")
            s = sparsity
            if allocation == "greedy":
                i, short = name.split(".")
                if int(i) not in per_layer:
                    per_layer[int(i)] = matrix_sparsities(self.allocations[method][int(i)], self.allocation_levels, s)
                s = per_layer[int(i)][short]
            tables = [table]
            if f"{method}_sparse" in self.quantiles[name]:
                tables += list(self.quantiles[name][f"{method}_sparse"])
            t = threshold_for(self.levels, tables, self.table_sparsities[: len(tables)], sparsity, s)
            lin.set_threshold(t, use_col_norm=method == "wina")
        self.method, self.sparsity, self.allocation = method, sparsity, allocation
        if self.fast:  # the fused kernels hold per-method scales, the CPU kernels per-shape choices
            from .kernels import refresh_fast_path

            refresh_fast_path(self.decoder)

    def prefill_spec(self, input_ids: torch.Tensor) -> SparseSpec:
        """Which tokens of a full-sequence forward are sparse under the current mode."""
        if self.mode == "paper":
            return paper_mask(*input_ids.shape, input_ids.device)
        return None

    def forward(self, input_ids: torch.Tensor, sparse: SparseSpec | str = "mode") -> torch.Tensor:
        """Logits [batch, seq, vocab] of a full-sequence forward (no cache); sparsity per the mode by default."""
        spec = self.prefill_spec(input_ids) if isinstance(sparse, str) else sparse
        with torch.no_grad():
            return self.decoder(input_ids.to(self.device), sparse=spec)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Prompt + new tokens [batch, seq + new]; see `wina.runtime.generate.generate` for arguments."""
        from .generate import generate

        return generate(self, input_ids, **kwargs)

    @contextlib.contextmanager
    def measure_sparsity(self) -> Iterator[SparsityMeter]:
        """Count the input channels actually dropped by every sparse linear while the block runs."""
        meter = SparsityMeter()
        linears = self.decoder.sparse_linears()
        for lin in linears.values():
            lin.meter = meter
        try:
            yield meter
        finally:
            for lin in linears.values():
                lin.meter = None

    def sparse_linears(self) -> dict[str, SparseLinear]:
        return self.decoder.sparse_linears()


def _dtype(dtype: str | torch.dtype | None, hf_config) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = getattr(hf_config, "dtype", None) or "float32"
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise WinaError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(path_or_id: str | Path, sparsity: float | None = None, **kwargs) -> WinaModel:
    """`wina.load(...)`: see `WinaModel.from_pretrained`."""
    return WinaModel.from_pretrained(path_or_id, sparsity=sparsity, **kwargs)
