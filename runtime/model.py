"""A compact decoder (Llama / Mistral / Qwen2 / Qwen3) whose seven linears per block are `SparseLinear`s.

gpt-fast style: one file, a static KV cache, positions passed explicitly, so CUDA graphs and kernels fit in.
Numerics follow transformers' eager implementation (fp32 RMSNorm and rotary tables) so dense logits match it.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from wina.archs import LINEARS
from wina.errors import WinaError
from wina.format import shortcut_key

from .config import DecoderConfig
from .sparse import SparseLinear, SparseSpec

# An attention mask [queries, keys] (True = attend), a function building it on first use, or None (causal).
Mask = torch.Tensor | Callable[[], torch.Tensor] | None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache(nn.Module):
    """Static cache [batch, kv_heads, max_len, head_dim]; `update` writes at explicit positions."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, bias: dict[str, bool]) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.window = cfg.sliding_windows[layer]
        self.q = SparseLinear(d, self.n_heads * hd, bias["q"], f"{layer}.q")
        self.k = SparseLinear(d, self.n_kv * hd, bias["k"], f"{layer}.k")
        self.v = SparseLinear(d, self.n_kv * hd, bias["v"], f"{layer}.v")
        self.o = SparseLinear(self.n_heads * hd, d, bias["o"], f"{layer}.o")
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.arch.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.arch.qk_norm else None
        self.cache: KVCache | None = None
        self.qkv: nn.Module | None = None  # fused q/k/v fast path (runtime/kernels.py): (x, sparse) -> (q, k, v)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor | None,
        sparse: SparseSpec,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x, sparse)
        else:
            q = self.q(x, sparse)
            # A k_proj stored narrowed to its live input columns (svd transform, GQA) reads only that prefix of x.
            kx = x if self.k.weight.shape[1] == x.shape[-1] else x[..., : self.k.weight.shape[1]]
            k, v = self.k(kx, sparse), self.v(x, sparse)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o(y, sparse)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, bias: dict[str, bool]) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = SparseLinear(d, f, bias["gate"], f"{layer}.gate")
        self.up = SparseLinear(d, f, bias["up"], f"{layer}.up")
        self.down = SparseLinear(f, d, bias["down"], f"{layer}.down")
        self.gate_up: nn.Module | None = None  # fused gate/up fast path (runtime/kernels.py): (x, sparse) -> (g, u)

    def forward(self, x: torch.Tensor, sparse: SparseSpec) -> torch.Tensor:
        if self.gate_up is not None:
            g, u = self.gate_up(x, sparse)
            return self.down(F.silu(g) * u, sparse)
        return self.down(F.silu(self.gate(x, sparse)) * self.up(x, sparse), sparse)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, bias: dict[str, bool]) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer, bias)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer, bias)
        # Residual shortcut rotations [hidden, hidden] (svd transform): x <- x @ S + sublayer(x); None = identity.
        self.register_parameter("attn_shortcut", None)
        self.register_parameter("mlp_shortcut", None)
        # Whole-block decode fast path (runtime/kernels.py `FusedDecodeStep`): returns None for calls it does not take.
        self.decode_step: Callable | None = None

    def linears(self) -> dict[str, SparseLinear]:
        a, m = self.attn, self.mlp
        return {"q": a.q, "k": a.k, "v": a.v, "o": a.o, "gate": m.gate, "up": m.up, "down": m.down}

    def forward(self, x, cos, sin, pos, mask: Mask, sparse: SparseSpec) -> torch.Tensor:
        if self.decode_step is not None:
            y = self.decode_step(x, cos, sin, pos, sparse)
            if y is not None:
                return y
        if callable(mask):
            mask = mask()
        if self.attn_shortcut is None and self.mlp_shortcut is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, pos, mask, sparse)
            return x + self.mlp(self.mlp_norm(x), sparse)
        res = x if self.attn_shortcut is None else x @ self.attn_shortcut
        x = res + self.attn(self.attn_norm(x), cos, sin, pos, mask, sparse)
        res = x if self.mlp_shortcut is None else x @ self.mlp_shortcut
        return res + self.mlp(self.mlp_norm(x), sparse)


class Rotary(nn.Module):
    """cos/sin tables for given positions, computed in fp32 like transformers.

    With a KV cache on CUDA (`build_table`), every position's rows are computed once, by the same elementwise
    kernels, and a decode step reads its row in one launch instead of nine (casts, products, cat, cos, sin): the
    same values, fewer launches per token. Not on the CPU, where a large tensor's cos/sin may take a different
    (vectorized or scalar) code path for some elements than a one-row tensor, so the bits could differ."""

    TABLE_DEVICES = ("cuda",)

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", cfg.inv_freq.clone(), persistent=False)
        self.scaling = cfg.rope_scaling
        self.table: torch.Tensor | None = None  # [2 (cos, sin), positions, head_dim]

    def forward(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.table is not None and self.table.dtype == dtype:
            cos_sin = self.table.index_select(1, pos)
            return cos_sin[0], cos_sin[1]
        freqs = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def build_table(self, max_len: int, dtype: torch.dtype) -> None:
        """Tables of positions [0, max_len) in `dtype`, on TABLE_DEVICES only."""
        self.table = None
        if self.inv_freq.device.type in self.TABLE_DEVICES:
            self.table = torch.stack(self(torch.arange(max_len, device=self.inv_freq.device), dtype))


class Decoder(nn.Module):
    """Embeddings, blocks, final norm, LM head. `forward(ids, pos, sparse)` returns logits."""

    def __init__(self, cfg: DecoderConfig, bias: dict[str, bool]) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed.weight.requires_grad_(False)
        self.blocks = nn.ModuleList(Block(cfg, i, bias) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg)
        self.max_cache_len = 0

    def sparse_linears(self) -> dict[str, SparseLinear]:
        """All sparse linears by `layer.kind` name (e.g. '3.gate')."""
        return {f"{i}.{k}": lin for i, blk in enumerate(self.blocks) for k, lin in blk.linears().items()}

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Allocate static KV caches; afterwards `forward` needs explicit positions."""
        p = self.embed.weight
        for blk in self.blocks:
            a = blk.attn
            a.cache = KVCache(batch, a.n_kv, max_len, a.head_dim, p.dtype, p.device)
        self.max_cache_len = max_len
        self.rotary.build_table(max_len, p.dtype)

    def clear_cache(self) -> None:
        for blk in self.blocks:
            blk.attn.cache = None
        self.max_cache_len = 0
        self.rotary.table = None

    def _mask(self, pos: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
        k = torch.arange(kv_len, device=pos.device)
        allowed = k[None, :] <= pos[:, None]
        if window is not None:
            allowed = allowed & (k[None, :] > pos[:, None] - window)
        return allowed

    def forward(
        self, input_ids: torch.Tensor, pos: torch.Tensor | None = None, sparse: SparseSpec = None
    ) -> torch.Tensor:
        """Logits for `input_ids` [batch, seq]. Without a cache, `pos` defaults to 0..seq-1 (causal)."""
        t = input_ids.shape[1]
        cached = self.max_cache_len > 0
        if pos is None:
            if cached:
                raise ValueError("pass explicit positions when a KV cache is set up")
            pos = torch.arange(t, device=input_ids.device)
        x = self.embed(input_ids)
        cos, sin = self.rotary(pos, x.dtype)
        masks: dict[int | None, Mask] = {}
        for blk in self.blocks:
            w = blk.attn.window
            if w not in masks:
                use_causal = not cached and (w is None or w >= t)
                # built on first use: blocks whose decode fast path takes the step never need it (two launches less)
                masks[w] = None if use_causal else functools.cache(
                    functools.partial(self._mask, pos, self.max_cache_len if cached else t, w))
            x = blk(x, cos, sin, pos, masks[w], sparse)
        return self.lm_head(self.norm(x))


def block_tensor_names(cfg: DecoderConfig, i: int) -> dict[str, str]:
    """Block parameter path -> Hugging Face tensor name (biases included; the loader skips absent ones)."""
    arch = cfg.arch
    names = {"attn_norm.weight": arch.layer_key(i, arch.attn_norm), "mlp_norm.weight": arch.layer_key(i, arch.mlp_norm)}
    for short in LINEARS:
        owner = "attn" if short in ("q", "k", "v", "o") else "mlp"
        names[f"{owner}.{short}.weight"] = arch.linear_key(i, short) + ".weight"
        names[f"{owner}.{short}.bias"] = arch.linear_key(i, short) + ".bias"
    for short, key in (arch.qk_norm or {}).items():
        names[f"attn.{short}_norm.weight"] = arch.layer_key(i, key)
    return names


def shortcut_tensor_names(cfg: DecoderConfig, i: int) -> dict[str, str]:
    """Block parameter path -> tensor name of the optional residual shortcut rotations (present only if stored)."""
    prefix = cfg.arch.layer_prefix.format(i=i)
    return {f"{kind}_shortcut": shortcut_key(prefix, kind) for kind in ("attn", "mlp")}


def global_tensor_names(cfg: DecoderConfig) -> dict[str, str]:
    names = {"embed.weight": cfg.arch.embed, "norm.weight": cfg.arch.final_norm}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = cfg.arch.lm_head
    return names


def bias_flags(cfg: DecoderConfig, has: Callable[[str], bool]) -> dict[str, bool]:
    """Which linears carry a bias, read from the tensors present (layer 0 speaks for all)."""
    return {s: has(cfg.arch.linear_key(0, s) + ".bias") for s in LINEARS}


def decoder_from_state(
    cfg: DecoderConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, where: str
) -> Decoder:
    """A Decoder whose parameters are `state`'s Hugging Face-named tensors (no copy when device/dtype match).

    Built on the meta device, so no memory is spent on weights that are replaced right away. `where` names the
    source in the error for a missing tensor. Buffers (column norms, thresholds) are the caller's to fill.
    """
    with torch.device("meta"):
        decoder = Decoder(cfg, bias_flags(cfg, state.__contains__))
    names = dict(global_tensor_names(cfg))
    for i in range(cfg.num_layers):
        names.update({f"blocks.{i}.{p}": n for p, n in block_tensor_names(cfg, i).items()})
    params = set(dict(decoder.named_parameters(remove_duplicate=False)))
    for i in range(cfg.num_layers):  # residual shortcut rotations, only where stored (svd transform)
        shortcuts = {f"blocks.{i}.{p}": n for p, n in shortcut_tensor_names(cfg, i).items() if n in state}
        names.update(shortcuts)
        params.update(shortcuts)
    for path, name in names.items():
        if path not in params:
            continue
        if name not in state:
            raise WinaError(f"{where}: tensor {name} is missing")
        owner, _, leaf = path.rpartition(".")
        setattr(decoder.get_submodule(owner), leaf, nn.Parameter(state[name].to(device, dtype), requires_grad=False))
    if cfg.tie_word_embeddings:
        decoder.lm_head.weight = decoder.embed.weight
    decoder.rotary.inv_freq = cfg.inv_freq.to(device)
    return decoder
