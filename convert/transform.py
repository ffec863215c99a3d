"""Orthogonal transforms of the weights, applied while converting (docs/FORMAT.md "Orthogonal transforms").

WINA's error bound is tight when the weight matrices that read a sparsified input are column-orthogonal. A decoder
with RMSNorm is invariant under an orthogonal change of basis of its residual stream once the norm gains are folded
into the linears that follow them (RMSNorm(xQ) = RMSNorm(x)Q), so the converter can rotate the stream to make
those matrices (closer to) column-orthogonal without changing what the model computes.

A transform hands the converter the tensors to store, HF name -> tensor (already in the output dtype), for the
global tensors and for one layer at a time. All rotation arithmetic runs in float64.

- `none`: the source tensors unchanged (the identity; the converter has one code path).
- `svd` (the paper's, SliceGPT style): layer i's attention input is rotated by V from the SVD of its folded W_k,
  its MLP input by V from the SVD of its folded W_gate. The two bases differ, so the residual stream is carried
  from one basis to the next by shortcut rotations `S_attn = Q_attnᵀ Q_mlp` and `S_mlp = Q_mlpᵀ Q_attn(i+1)`
  (the last layer's `S_mlp` is the identity and is not stored: the LM head reads the last MLP basis). W_k V has
  (hidden − kv_dim) zero columns under GQA; `k_proj` is stored narrowed to its live columns.
- `shared`: one rotation for the whole model: the eigenvectors of Σ_layers Σ_{W ∈ q,k,v,gate,up} WᵀW / ‖WᵀW‖_F
  (the folded input matrices, each Gram matrix normalised so every matrix counts the same). No shortcuts: the
  checkpoint is an ordinary dense model of the source architecture (loadable by transformers).

Rotating the embeddings and the LM head differently from each other unties tied embeddings (`lm_head.weight` is
written). The embedding mean is *not* subtracted (for RMSNorm models that would change the outputs).
"""

from __future__ import annotations

import dataclasses

import torch

from wina.errors import WinaError
from wina.format import TRANSFORMS, shortcut_key
from wina.runtime.config import DecoderConfig
from wina.runtime.model import block_tensor_names, global_tensor_names

from .source import Source

F64 = torch.float64
INPUTS = {"attn": ("q", "k", "v"), "mlp": ("gate", "up")}
OUTPUTS = {"attn": "o", "mlp": "down"}
# The matrix whose right singular vectors define each per-layer basis of the `svd` transform.
SVD_ANCHOR = {"attn": "k", "mlp": "gate"}
# Input matrices whose Gram matrices the `shared` rotation diagonalises (jointly).
SHARED_GRAM = ("q", "k", "v", "gate", "up")


def make_transform(name: str, source: Source, cfg: DecoderConfig, dtype: torch.dtype) -> "Transform":
    if name not in TRANSFORMS:
        raise WinaError(f"unknown transform {name!r}: choose one of {', '.join(TRANSFORMS)}")
    return {"none": Identity, "svd": SVDRotation, "shared": SharedRotation}[name](source, cfg, dtype)


class Transform:
    """The identity: tensors as the source holds them, rounded to the output dtype."""

    name = "none"

    def __init__(self, source: Source, cfg: DecoderConfig, dtype: torch.dtype) -> None:
        self.source, self.src_cfg, self.dtype = source, cfg, dtype

    @property
    def config(self) -> DecoderConfig:
        """The decoder config of the written checkpoint."""
        return self.src_cfg

    def globals(self) -> dict[str, torch.Tensor]:
        return {n: self.source.get(n).to(self.dtype) for n in global_tensor_names(self.config).values()}

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        names = block_tensor_names(self.config, i).values()
        return {n: self.source.get(n).to(self.dtype) for n in names if n in self.source.names}


Identity = Transform


class Rotation(Transform):
    """Fold RMSNorm gains, then rotate the residual stream by per-sublayer bases `basis(i, 'attn'|'mlp')`."""

    def __init__(self, source: Source, cfg: DecoderConfig, dtype: torch.dtype) -> None:
        super().__init__(source, cfg, dtype)
        self._cfg = dataclasses.replace(cfg, tie_word_embeddings=False)

    @property
    def config(self) -> DecoderConfig:
        return self._cfg

    # -- helpers -------------------------------------------------------------------------------------------------
    def _f64(self, name: str) -> torch.Tensor:
        return self.source.get(name).to(F64)

    def _gain(self, i: int, part: str) -> torch.Tensor:
        arch = self.src_cfg.arch
        return self._f64(arch.layer_key(i, arch.attn_norm if part == "attn" else arch.mlp_norm))

    def folded(self, i: int, short: str) -> torch.Tensor:
        """W · diag(g) in float64: the input matrix with the preceding RMSNorm gain folded in."""
        part = "attn" if short in INPUTS["attn"] else "mlp"
        return self._f64(self.src_cfg.arch.linear_key(i, short) + ".weight") * self._gain(i, part)

    def basis(self, i: int, part: str) -> torch.Tensor:
        raise NotImplementedError

    def final_basis(self) -> torch.Tensor:
        return self.basis(self.src_cfg.num_layers - 1, "mlp")

    def narrow(self, i: int, short: str, w: torch.Tensor) -> torch.Tensor:
        """Columns of the rotated input matrix to store (all, unless a transform knows some are zero)."""
        return w

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype).contiguous()

    # -- the transform -------------------------------------------------------------------------------------------
    def globals(self) -> dict[str, torch.Tensor]:
        arch, cfg = self.src_cfg.arch, self.src_cfg
        embed = self._f64(arch.embed)
        head = embed if cfg.tie_word_embeddings else self._f64(arch.lm_head)
        head = head * self._f64(arch.final_norm)
        return {
            arch.embed: self._out(embed @ self.basis(0, "attn")),
            arch.final_norm: self._out(torch.ones(cfg.hidden_size, dtype=F64)),
            arch.lm_head: self._out(head @ self.final_basis()),
        }

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        cfg, arch, names = self.src_cfg, self.src_cfg.arch, self.source.names
        last = i == cfg.num_layers - 1
        q = {"attn": self.basis(i, "attn"), "mlp": self.basis(i, "mlp")}
        q_next = self.final_basis() if last else self.basis(i + 1, "attn")
        out: dict[str, torch.Tensor] = {}
        for part, shorts in INPUTS.items():
            for short in shorts:
                key = arch.linear_key(i, short)
                out[key + ".weight"] = self._out(self.narrow(i, short, self.folded(i, short) @ q[part]))
                if key + ".bias" in names:
                    out[key + ".bias"] = self.source.get(key + ".bias").to(self.dtype)
        # Outputs land in the basis of the next sublayer: the attention's in the MLP basis, the MLP's in the next
        # layer's attention basis. Row form: y Q = (a Wᵀ + b) Q = a (QᵀW)ᵀ + b Q.
        for part, dest in (("attn", q["mlp"]), ("mlp", q_next)):
            key = arch.linear_key(i, OUTPUTS[part])
            out[key + ".weight"] = self._out(dest.T @ self._f64(key + ".weight"))
            if key + ".bias" in names:
                out[key + ".bias"] = self._out(self._f64(key + ".bias") @ dest)
        ones = torch.ones(cfg.hidden_size, dtype=F64)
        out[arch.layer_key(i, arch.attn_norm)] = self._out(ones)
        out[arch.layer_key(i, arch.mlp_norm)] = self._out(ones)
        for key in (arch.qk_norm or {}).values():  # per-head norms on q/k outputs: untouched by the rotation
            out[arch.layer_key(i, key)] = self.source.get(arch.layer_key(i, key)).to(self.dtype)
        prefix = arch.layer_prefix.format(i=i)
        if q["mlp"] is not q["attn"]:
            out[shortcut_key(prefix, "attn")] = self._out(q["attn"].T @ q["mlp"])
        if q_next is not q["mlp"]:
            out[shortcut_key(prefix, "mlp")] = self._out(q["mlp"].T @ q_next)
        return out


def right_singular_basis(w: torch.Tensor) -> torch.Tensor:
    """V [in, in] (float64) of W = U Σ Vᵀ, columns by decreasing singular value (full basis when out < in)."""
    _, _, vh = torch.linalg.svd(w.to(F64), full_matrices=w.shape[0] < w.shape[1])
    return vh.T.contiguous()


class SVDRotation(Rotation):
    """The paper's transform: per layer, V of the SVD of the folded W_k (attention) and W_gate (MLP)."""

    name = "svd"

    def __init__(self, source: Source, cfg: DecoderConfig, dtype: torch.dtype) -> None:
        super().__init__(source, cfg, dtype)
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    def basis(self, i: int, part: str) -> torch.Tensor:
        if (i, part) not in self._cache:
            for old in [k for k in self._cache if k[0] < i - 1]:  # layers are visited in order
                del self._cache[old]
            self._cache[(i, part)] = right_singular_basis(self.folded(i, SVD_ANCHOR[part]))
        return self._cache[(i, part)]

    def narrow(self, i: int, short: str, w: torch.Tensor) -> torch.Tensor:
        # W V = U Σ: only the first rank <= min(out, in) columns are non-zero; the rest are zero exactly (in exact
        # arithmetic) and are dropped, so the runtime reads only the live prefix of the input.
        part = "attn" if short in INPUTS["attn"] else "mlp"
        if short == SVD_ANCHOR[part] and w.shape[0] < w.shape[1]:
            return w[:, : w.shape[0]]
        return w


class SharedRotation(Rotation):
    """One rotation for every layer: eigenvectors of the summed normalised Gram matrices of the input matrices."""

    name = "shared"

    def __init__(self, source: Source, cfg: DecoderConfig, dtype: torch.dtype) -> None:
        super().__init__(source, cfg, dtype)
        self.q = shared_basis(self, cfg.num_layers)

    def basis(self, i: int, part: str) -> torch.Tensor:
        return self.q


def shared_basis(rot: Rotation, num_layers: int, shorts: tuple[str, ...] = SHARED_GRAM) -> torch.Tensor:
    d = rot.src_cfg.hidden_size
    total = torch.zeros(d, d, dtype=F64)
    for i in range(num_layers):
        for short in shorts:
            w = rot.folded(i, short)
            g = w.T @ w
            total += g / g.norm()
    evals, evecs = torch.linalg.eigh(total)
    return evecs.flip(-1).contiguous()  # decreasing eigenvalue


def offdiag_ratio(w: torch.Tensor) -> float:
    """‖G − diag(G)‖_F / ‖G‖_F of the Gram matrix G = WᵀW: 0 for column-orthogonal W."""
    g = w.to(F64).T @ w.to(F64)
    return float((g - torch.diag(torch.diag(g))).norm() / g.norm())
