"""The runtime's view of a Hugging Face config: the few numbers a decoder needs, resolved once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from wina.archs import ArchSpec, arch_for


@dataclass
class DecoderConfig:
    arch: ArchSpec
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    inv_freq: torch.Tensor  # rotary inverse frequencies, fp32 [head_dim // 2]
    rope_scaling: float  # multiplier on cos/sin (1.0 except for yarn/longrope)
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> "DecoderConfig":
        arch = arch_for(getattr(hf, "model_type", None))
        n_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
        inv_freq, scaling = _rope(hf, head_dim)
        window = getattr(hf, "sliding_window", None)
        layer_types = getattr(hf, "layer_types", None)
        windows = tuple(
            window if window and (layer_types is None or layer_types[i] == "sliding_attention") else None
            for i in range(hf.num_hidden_layers)
        )
        return cls(
            arch=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=n_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            max_position_embeddings=getattr(hf, "max_position_embeddings", 4096),
            inv_freq=inv_freq,
            rope_scaling=scaling,
            sliding_windows=windows,
        )


def _rope(hf: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Rotary frequencies exactly as transformers computes them (its own functions for scaled variants)."""
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        partial = params.get("partial_rotary_factor", 1.0)
        dim = int(head_dim * partial)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        return inv_freq, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return inv_freq.float(), float(scaling)
