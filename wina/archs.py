"""Architecture families as data.

Every difference between supported decoder families lives in one `ArchSpec` row: where the tensors are, which
projections carry biases, which norms exist. Code elsewhere reads these fields; it never branches on a model name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import WinaError

# The seven linear layers of a decoder block, in execution order, under their short names.
LINEARS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
# Linears that read the same input vector (and therefore share one activation capture).
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("q", "k", "v"),
    "o_in": ("o",),
    "mlp_in": ("gate", "up"),
    "down_in": ("down",),
}


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its tensors (Hugging Face names) and what its blocks contain."""

    family: str
    model_types: tuple[str, ...]
    hf_architectures: tuple[str, ...]
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer_prefix: str = "model.layers.{i}."
    attn_norm: str = "input_layernorm.weight"
    mlp_norm: str = "post_attention_layernorm.weight"
    linears: dict[str, str] = field(
        default_factory=lambda: {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
        }
    )
    # Per-head RMSNorm on queries and keys before rotary embedding (Qwen3).
    qk_norm: dict[str, str] | None = None
    # Activation of the gated MLP.
    hidden_act: str = "silu"

    def layer_key(self, i: int, name: str) -> str:
        return self.layer_prefix.format(i=i) + name

    def linear_key(self, i: int, short: str) -> str:
        return self.layer_key(i, self.linears[short])


ARCHS: dict[str, ArchSpec] = {
    spec.family: spec
    for spec in (
        ArchSpec("llama", ("llama",), ("LlamaForCausalLM",)),
        ArchSpec("mistral", ("mistral",), ("MistralForCausalLM",)),
        ArchSpec(
            "qwen2",
            ("qwen2",),
            ("Qwen2ForCausalLM",),
        ),
        ArchSpec(
            "qwen3",
            ("qwen3",),
            ("Qwen3ForCausalLM",),
            qk_norm={"q": "self_attn.q_norm.weight", "k": "self_attn.k_norm.weight"},
        ),
    )
}

SUPPORTED = ", ".join(sorted(ARCHS))


def arch_for(model_type: str | None) -> ArchSpec:
    """The spec for a config's `model_type`, or a one-line error naming what is supported."""
    for spec in ARCHS.values():
        if model_type in spec.model_types:
            return spec
    raise WinaError(f"unsupported architecture {model_type!r}: wina supports {SUPPORTED}")
