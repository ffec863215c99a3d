"""`wina bench`: sparse vs dense linear time per matrix, and end-to-end decode tokens/s.

Per matrix (each kind of linear, fused as the fast path runs it): sparse time, dense time, and the ideal
(1 - s) x dense, at several sparsities, with activations drawn so the threshold keeps exactly a (1 - s) fraction.
Per layer (CUDA): the same three times, measured as the decode step runs a layer (`layer_chain`: all its kernels
but the attention, in context). End to end: greedy decode tok/s of this repo's decoder dense and sparse (same loop;
CUDA graphs on GPU), and transformers' own model with its static cache, dense, in the same run.

Models: a checkpoint (CPU: SmolLM2) or, with `--synthetic llama3-8b`, a Llama-3-8B-shaped model with random weights
built on the device; its thresholds are calibrated on its own activations (score quantiles of a dense pass).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .decode import DecodeRunner, time_decode
from .kernels import FusedDecodeStep, FusedSparseLinear, enable_fast_path
from .sparse import SparseLinear

SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65)
LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
    tie_word_embeddings=False,
)


# ----------------------------------------------------------------------------------------------- models
def synthetic_hf(shape: dict, device, dtype, seed: int = 0, layers: int | None = None):
    """A transformers Llama with random weights (std 0.02, norms 1) built directly on `device` in `dtype`."""
    import transformers

    kw = dict(shape)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cfg = transformers.LlamaConfig(**kw)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0)
    return model.eval()


def decoder_from_hf(hf) -> nn.Module:
    """This repo's Decoder sharing the weight tensors of a transformers model (no copy)."""
    from .config import DecoderConfig
    from .model import decoder_from_state

    w = hf.get_input_embeddings().weight
    dec = decoder_from_state(DecoderConfig.from_hf(hf.config), dict(hf.state_dict()), w.device, w.dtype, "model")
    for lin in dec.sparse_linears().values():
        lin.col_norm = lin.weight.float().norm(dim=0)
        lin.threshold = torch.zeros((), device=w.device)
    return dec.eval()


@torch.no_grad()
def calibrate(dec, ids: torch.Tensor, method: str = "wina") -> dict[str, torch.Tensor]:
    """Score-quantile tables of every sparse linear from a dense pass over `ids` (the converter's statistic)."""
    from wina.calibration.stats import score_quantiles

    tables: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    hooks = []
    for name, lin in dec.sparse_linears().items():
        def hook(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1])
            tables[name] = score_quantiles(x, mod.col_norm if method == "wina" else None, g)

        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        dec(ids, sparse=None)
    finally:
        for h in hooks:
            h.remove()
    return tables


def set_sparsity(dec, tables: dict[str, torch.Tensor], s: float, method: str = "wina") -> None:
    from wina.calibration.stats import sparsity_levels
    from wina.calibration.thresholds import threshold_at

    levels = sparsity_levels()
    for name, lin in dec.sparse_linears().items():
        lin.set_threshold(threshold_at(levels, tables[name], s), use_col_norm=method == "wina")


# ----------------------------------------------------------------------------------------------- timing
def _graph_time_us(fns, min_calls: int = 64, reps: int = 5) -> float:
    for f in fns:
        f()
    torch.cuda.synchronize()
    nround = max(1, math.ceil(min_calls / len(fns)))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(nround):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (nround * len(fns)))
    del g
    return sorted(ts)[len(ts) // 2]


def _cpu_time_us(fns, reps: int = 3) -> float:
    for f in fns:
        f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for f in fns:
            f()
        best = min(best, (time.perf_counter() - t0) / len(fns))
    return best * 1e6


def _kinds(blk) -> dict[str, nn.Module]:
    """The matrices of a block as the fast path runs them."""
    a, m = blk.attn, blk.mlp
    if a.qkv is not None:
        return {"qkv": a.qkv, "o": a.o, "gate_up": m.gate_up, "down": m.down}
    return {k: v for k, v in blk.linears().items()}


def _parts(mod) -> list[SparseLinear]:
    return list(mod.parts) if isinstance(mod, FusedSparseLinear) else [mod]


@torch.no_grad()
def matrix_bench(dec, sparsities=SPARSITIES, max_layers: int | None = None) -> dict:
    """Per matrix kind: us per call of dense and sparse, cycling over the model's layers (weights from memory, not
    cache). Thresholds are set per call so that exactly a fraction s of the channels is dropped."""
    dev = dec.embed.weight.device
    dt = dec.embed.weight.dtype
    cuda = dev.type == "cuda"
    blocks = list(dec.blocks)[: max_layers or None]
    kinds = list(_kinds(blocks[0]).keys())
    saved = {n: (lin.threshold_value, lin.use_col_norm) for n, lin in dec.sparse_linears().items()}
    res: dict = {}
    g = torch.Generator(device=dev).manual_seed(0)
    try:
        for kind in kinds:
            mods = [_kinds(b)[kind] for b in blocks]
            K = _parts(mods[0])[0].in_features
            x = torch.randn(1, 1, K, device=dev, dtype=dt, generator=g)
            row = {}
            for s in sparsities:
                for mod in mods:
                    for lin in _parts(mod):
                        score = (x.float().abs() * lin.col_norm).flatten()
                        t = float(torch.quantile(score, s)) if s > 0 else 0.0
                        lin.set_threshold(t, True)
                        if s > 0 and t <= 0:
                            lin.set_threshold(1e-30, True)
                sp = True if s > 0 else None
                if isinstance(mods[0], FusedSparseLinear):  # as the decode step runs them: one GEMV each way
                    x2 = x.view(1, -1)
                    fs = [lambda m=m: m.joint(x2, sp) for m in mods]
                    fd = [lambda m=m: m.joint(x2, None) for m in mods]
                else:
                    fs = [lambda m=m: m(x, sp) for m in mods]
                    fd = [lambda m=m: m(x, None) for m in mods]
                timer = _graph_time_us if cuda else _cpu_time_us
                d = timer(fd)
                sps = timer(fs)
                row[str(s)] = {"dense_us": d, "sparse_us": sps, "ideal_us": (1 - s) * d}
            res[kind] = row
    finally:
        for n, lin in dec.sparse_linears().items():
            lin.set_threshold(*saved[n])
    layer = {}
    for s in sparsities:
        k = str(s)
        d = sum(res[kd][k]["dense_us"] for kd in kinds)
        sp = sum(res[kd][k]["sparse_us"] for kd in kinds)
        layer[k] = {"dense_us": d, "sparse_us": sp, "ideal_us": (1 - s) * d, "sparse_over_ideal": sp / max((1 - s) * d, 1e-9)}
    return {"matrices": res, "layer": layer}


class _WithoutAttention(FusedDecodeStep):
    """A block's decode step whose attention answers with the output it computed on the step's first call. What is
    left are exactly the kernels the decode step runs for the layer's linears (q/k/v with its RMSNorm, o and the
    residual, the MLP's RMSNorm, gate/up, down and the residual), on the data of that first, real step."""

    def __init__(self, blk: nn.Module) -> None:
        super().__init__(blk)
        self.inputs: tuple | None = None
        self.y: torch.Tensor | None = None

    def __call__(self, x, cos, sin, pos, sparse):
        x0 = x.clone() if self.inputs is None else None
        out = super().__call__(x, cos, sin, pos, sparse)
        if out is not None and x0 is not None:  # the first decode row this step took (not the prefill)
            self.inputs = (x0, cos, sin, pos)
        return out

    def attention(self, *args, **kw) -> torch.Tensor:
        if self.y is None:
            self.y = super().attention(*args, **kw).clone()
        return self.y


@contextlib.contextmanager
@torch.no_grad()
def linears_only(dec, prompt: torch.Tensor) -> Iterator[Callable | None]:
    """`chain(sparse) -> x`: one decode token through every block without its attention (`_WithoutAttention`),
    from the first block's input of a real decode step after `prompt`; None where the blocks do not run
    `FusedDecodeStep`. The blocks' own steps are back afterwards."""
    blocks = list(dec.blocks)
    if not all(isinstance(b.decode_step, FusedDecodeStep) for b in blocks):
        yield None
        return
    saved = [b.decode_step for b in blocks]
    steps = [_WithoutAttention(b) for b in blocks]
    runner = None
    try:
        for b, st in zip(blocks, steps):
            b.decode_step = st
        runner = DecodeRunner(dec, 1, prompt.shape[1] + 2, sparse=True, use_graph=False)
        runner.prefill(prompt)
        runner.step()  # records each block's input and attention output

        def chain(sparse) -> torch.Tensor:
            x = steps[0].inputs[0]
            for st in steps:
                x = st(x, *st.inputs[1:], sparse)
            return x

        yield chain
    finally:
        if runner is not None:
            runner.close()
        for b, st in zip(blocks, saved):
            b.decode_step = st


@torch.no_grad()
def layer_chain(dec, prompt: torch.Tensor, s: float) -> dict | None:
    """Per decoder layer, in us: the wall time of a decode step's kernels other than the attention, dense and
    sparse (thresholds as set, for sparsity s), the layers one after another in a CUDA graph as the decode step runs
    them (with the runtime's settings: `run_bench`'s "without PDL" ablation times it without programmatic dependent
    launch). Dense counts its two RMSNorm launches, which sparse runs inside q/k/v and its compaction launch. CUDA
    with `FusedDecodeStep` only, else None."""
    if dec.embed.weight.device.type != "cuda":
        return None
    n = len(dec.blocks)
    with linears_only(dec, prompt) as chain:
        if chain is None:
            return None
        d = _graph_time_us([lambda: chain(None)], min_calls=16) / n
        sp = _graph_time_us([lambda: chain(True)], min_calls=16) / n
    return {"dense_us": d, "sparse_us": sp, "ideal_us": (1 - s) * d, "sparse_over_ideal": sp / ((1 - s) * d)}


@torch.no_grad()
def hf_static_tok_s(hf, prompt: torch.Tensor, n_tokens: int, compile: bool = False, log=print) -> float:
    """transformers' greedy generate with its static cache, dense: decode tok/s (prefill subtracted, best of two).
    `compile=True` keeps generate's automatic torch.compile of the decode step (the fast configuration; the first
    call compiles, ~1 min for an 8B model on an H200, and is not timed); False runs it eagerly."""
    dev = prompt.device

    def run(n):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static",
                    pad_token_id=0, disable_compile=not compile)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    t_first = run(4)
    if compile:
        log(f"transformers static cache: first (compiling) call {t_first:.1f}s")
        run(4)
    t1 = min(run(1) for _ in range(2))
    tn = min(run(n_tokens + 1) for _ in range(2))
    return prompt.shape[0] * n_tokens / max(tn - t1, 1e-9)


def e2e(dec, prompt, n_tokens: int, hf=None, rounds: int = 2, hf_compile: bool = False, log=print) -> dict:
    """Interleaved dense / sparse decode timing (best of `rounds`), plus HF static-cache dense if given."""
    dense, sparse = [], []
    ids = {}
    for _ in range(rounds):
        r = time_decode(dec, prompt, n_tokens, sparse=None)
        dense.append(r["tok_s"])
        ids["dense"] = r["ids"]
        r = time_decode(dec, prompt, n_tokens, sparse=True)
        sparse.append(r["tok_s"])
        ids["sparse"] = r["ids"]
    out = {"dense_tok_s": max(dense), "sparse_tok_s": max(sparse), "dense_runs": dense, "sparse_runs": sparse}
    out["sparse_over_dense"] = out["sparse_tok_s"] / out["dense_tok_s"]
    out["sparse_over_dense_by_round"] = [s / d for s, d in zip(sparse, dense)]
    if hf is not None:
        out["hf_static_tok_s"] = hf_static_tok_s(hf, prompt, n_tokens, compile=hf_compile, log=log)
        out["hf_compiled"] = hf_compile
        out["sparse_over_hf"] = out["sparse_tok_s"] / out["hf_static_tok_s"]
    out["first_tokens"] = {k: v[0, :8].tolist() for k, v in ids.items()}
    return out


# ----------------------------------------------------------------------------------------------- entry
def run_bench(checkpoint: str | None = None, synthetic: str | None = None, device: str = "cpu", dtype: str = "auto",
              sparsity: float = 0.5, tokens: int = 32, prompt_len: int = 32, sparsities=SPARSITIES, rounds: int = 2,
              skip_hf: bool = False, skip_matrices: bool = False, layers: int | None = None, hf_compile: bool = False,
              log=print, ablate: dict[str, dict] | None = None) -> dict:
    """`wina bench`'s measurements (see runtime/cli.py). `ablate`: {label: {runtime setting: value}}, each
    timed end to end in the same process after the main figures (CUDA only)."""
    dev = torch.device(device)
    result: dict = {"device": str(dev), "sparsity": sparsity, "tokens": tokens}
    if dev.type == "cpu":
        result["threads"] = torch.get_num_threads()
    if synthetic:
        dt = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
              "float32": torch.float32}[dtype]
        t0 = time.perf_counter()
        hf = synthetic_hf(LLAMA3_8B, dev, dt, layers=layers)
        dec = decoder_from_hf(hf)
        g = torch.Generator().manual_seed(1)
        calib = torch.randint(0, hf.config.vocab_size, (1, 64), generator=g).to(dev)
        tables = calibrate(dec, calib)
        set_sparsity(dec, tables, sparsity)
        result["model"] = f"synthetic {synthetic} ({len(dec.blocks)} layers, random {dt})"
        log(f"built {result['model']} in {time.perf_counter() - t0:.1f}s")
    else:
        from .wina_model import load

        model = load(checkpoint, sparsity=sparsity, mode="decode", device=device, dtype=dtype)
        dec = model.decoder
        dt = dec.embed.weight.dtype
        hf = None
        if not skip_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dt).to(dev).eval()
        result["model"] = f"{checkpoint} ({dt})"
    result["dtype"] = str(dt).removeprefix("torch.")
    result["fast_path"] = enable_fast_path(dec)
    log(f"fast path: {result['fast_path']}")
    if not skip_matrices:
        mb = matrix_bench(dec, sparsities)
        result.update(mb)
        for kind, row in mb["matrices"].items():
            log(f"  {kind:8s} " + "  ".join(
                f"s={s}: dense {r['dense_us']:.1f} sparse {r['sparse_us']:.1f} ideal {r['ideal_us']:.1f} us"
                for s, r in row.items()))
        for s, r in mb["layer"].items():
            log(f"  layer s={s}: dense {r['dense_us']:.1f} sparse {r['sparse_us']:.1f} ideal {r['ideal_us']:.1f} us "
                f"(sparse/ideal {r['sparse_over_ideal']:.3f})")
    g = torch.Generator().manual_seed(2)
    vocab = dec.embed.weight.shape[0]
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g).to(dev)
    if not synthetic and getattr(model, "tokenizer", None) is not None:
        text = "The history of the city begins in the early middle ages, when a small settlement grew around"
        p = model.tokenizer(text, return_tensors="pt").input_ids[:, :prompt_len]
        prompt = p.to(dev)
    if not skip_matrices:
        result["layer_chain"] = lc = layer_chain(dec, prompt, sparsity)
        if lc is not None:
            log(f"  layer chain s={sparsity} (the decode step's kernels but the attention, wall time): dense "
                f"{lc['dense_us']:.1f} sparse {lc['sparse_us']:.1f} ideal {lc['ideal_us']:.1f} us "
                f"(sparse/ideal {lc['sparse_over_ideal']:.3f})")
    result.update(e2e(dec, prompt, tokens, hf=None if skip_hf else hf, rounds=rounds, hf_compile=hf_compile, log=log))
    log(f"decode: own dense {result['dense_tok_s']:.1f} tok/s, own sparse {result['sparse_tok_s']:.1f} tok/s "
        f"({result['sparse_over_dense']:.2f}x)" + (
            f", transformers static dense{' (compiled)' if hf_compile else ''} {result['hf_static_tok_s']:.1f} tok/s "
            f"(sparse {result['sparse_over_hf']:.2f}x)" if "hf_static_tok_s" in result else ""))
    if dev.type == "cuda":
        from . import triton_kernels as tk

        # what PDL buys (None where it is not in use), and any ablations asked for
        chain_s = None if skip_matrices else sparsity  # the ablations' per-layer reading too
        result["no_pdl"] = _ablation(dec, prompt, tokens, rounds, log, "without PDL", chain_s,
                                     PDL=False) if tk.pdl_args(dev) else None
        for label, overrides in (ablate or {}).items():
            result.setdefault("ablations", {})[label] = _ablation(dec, prompt, tokens, rounds, log, label, chain_s,
                                                                  **overrides)
    return result


def _setting(key: str) -> tuple[object, str]:
    """(owner, attribute) of a runtime setting: 'NAME' in triton_kernels, or 'module.NAME' / 'module.Class.NAME'
    in wina.runtime.<module>."""
    import importlib

    *path, name = key.split(".")
    owner = importlib.import_module(f"{__package__}.{path[0] if path else 'triton_kernels'}")
    for part in path[1:]:
        owner = getattr(owner, part)
    if not hasattr(owner, name):
        raise AttributeError(f"no setting {key}")
    return owner, name


def _ablation(dec, prompt, tokens: int, rounds: int, log, label: str, sparsity: float | None = None,
              **settings) -> dict:
    """The same decode loop with some runtime settings changed (e.g. PDL=False, triton_decode.ATTN_SPLIT=64; see
    `_setting`), then restored; with `sparsity`, also the per-layer reading (`layer_chain`)."""
    owners = {k: _setting(k) for k in settings}
    saved = {k: getattr(*owners[k]) for k in settings}
    for k, v in settings.items():
        setattr(*owners[k], v)
    try:
        r = e2e(dec, prompt, tokens, rounds=rounds)
        lc = layer_chain(dec, prompt, sparsity) if sparsity is not None else None
    finally:
        for k, v in saved.items():
            setattr(*owners[k], v)
    out = {k: r[k] for k in ("dense_tok_s", "sparse_tok_s", "sparse_over_dense")}
    if lc is not None:
        out["layer_chain"] = lc
    log(f"{label}: own dense {r['dense_tok_s']:.1f}, own sparse {r['sparse_tok_s']:.1f} tok/s" + (
        f"; layer chain dense {lc['dense_us']:.1f} sparse {lc['sparse_us']:.1f} us "
        f"(sparse/ideal {lc['sparse_over_ideal']:.3f})" if lc is not None else ""))
    return out
