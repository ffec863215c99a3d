"""Decode loop with a static KV cache; on CUDA each step is one CUDA-graph replay.

`DecodeRunner(decoder, batch, max_len, sparse)` owns static input buffers (token, position) and, on CUDA, a graph
that runs one decoder step, greedy argmax, and advances the position in place, so consecutive steps need no host
work besides `replay()`. The same runner with `sparse=None` is the dense baseline. On CPU (or with
`use_graph=False`) the step runs eagerly with the same buffers.
"""

from __future__ import annotations

import time

import torch

from .sparse import SparseSpec


class DecodeRunner:
    def __init__(self, decoder, batch: int, max_len: int, sparse: SparseSpec = True, use_graph: bool | None = None):
        self.dec = decoder
        self.sparse = sparse
        dev = decoder.embed.weight.device
        self.device = dev
        self.use_graph = dev.type == "cuda" if use_graph is None else use_graph
        self.batch, self.max_len = batch, max_len
        decoder.setup_cache(batch, max_len)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, sparse: SparseSpec = None) -> torch.Tensor:
        """Run the prompt [batch, t] (dense by default), leave its greedy next token in `tok`; returns it."""
        t = ids.shape[1]
        logits = self.dec(ids, pos=torch.arange(t, device=self.device), sparse=sparse)[:, -1]
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(t)
        return self.tok

    def _step(self) -> None:
        logits = self.dec(self.tok, pos=self.pos, sparse=self.sparse)[:, -1]
        self.logits = logits
        greedy_token(logits, out=self.tok, advance=self.pos)

    @torch.no_grad()
    def capture(self) -> None:
        """Warm up (kernels compiled, workspaces allocated) and capture one step; restores tok/pos."""
        if not self.use_graph or self.graph is not None:
            return
        tok0, pos0 = self.tok.clone(), self.pos.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.tok.copy_(tok0)
        self.pos.copy_(pos0)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One decode step from `tok` at `pos`: afterwards `tok` holds the next greedy token. Returns `tok`."""
        if self.use_graph:
            self.capture()
            self.graph.replay()
        else:
            self._step()
        return self.tok

    @torch.no_grad()
    def decode(self, n: int) -> torch.Tensor:
        """n greedy steps; returns the tokens [batch, n] (each step's input token first, i.e. tok before step)."""
        out = torch.empty(self.batch, n, dtype=torch.long, device=self.device)
        for i in range(n):
            out[:, i : i + 1].copy_(self.tok)
            self.step()
        return out

    def close(self) -> None:
        self.graph = None
        self.dec.clear_cache()


@torch.no_grad()
def teacher_forced_logits(decoder, ids: torch.Tensor, prompt_len: int, sparse: SparseSpec = True,
                          use_graph: bool | None = None) -> torch.Tensor:
    """Logits [steps, batch, vocab] of decode steps fed the given tokens: a dense prefill of ids[:, :prompt_len], then
    one step per remaining token of `ids`. Compares two decode paths on the same inputs (greedy decoding would
    follow each path's own tokens)."""
    b, t = ids.shape
    r = DecodeRunner(decoder, b, t + 2, sparse=sparse, use_graph=use_graph)
    try:
        r.prefill(ids[:, :prompt_len])
        out = []
        for i in range(prompt_len, t):
            r.tok.copy_(ids[:, i : i + 1])
            r.step()
            out.append(r.logits.clone())
    finally:
        r.close()
    return torch.stack(out)


def greedy_token(logits: torch.Tensor, out: torch.Tensor | None = None,
                 advance: torch.Tensor | None = None) -> torch.Tensor:
    """argmax over the vocabulary, [B, V] -> [B, 1] (into `out` if given); then `advance` (a position) += 1. On
    CUDA, wide rows take the two-launch Triton argmax, which also writes `out` and advances the position: torch's
    single-row argmax over a 128k vocabulary is one ~36 us kernel per token on an H200 (benchmarks/gpu_profile.py),
    and its result's gather, cast, copy and the increment four more launches. Triton is imported only there
    (importing it costs ~0.25 s on the CPU machine)."""
    if logits.is_cuda and logits.shape[1] >= 16384 and logits.is_contiguous():
        from . import triton_decode as td

        if td.HAVE_TRITON and (out is None or out.is_contiguous()):
            return td.argmax_two_stage(logits, out=out, advance=advance)
    tok = logits.argmax(-1, keepdim=True)
    if out is not None:
        tok = out.copy_(tok)
    if advance is not None:
        advance.add_(1)
    return tok


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def time_decode(decoder, prompt: torch.Tensor, n_tokens: int, sparse: SparseSpec, use_graph: bool | None = None,
                warmup: int = 3) -> dict:
    """Tokens/s of greedy decode (after a dense prefill of `prompt`) with the runner. Returns a dict with tok_s,
    ms_per_token and the generated ids (CPU tensor)."""
    b, t = prompt.shape
    r = DecodeRunner(decoder, b, t + n_tokens + warmup + 2, sparse=sparse, use_graph=use_graph)
    try:
        r.prefill(prompt)
        r.capture()
        tok0, pos0 = r.tok.clone(), r.pos.clone()
        for _ in range(warmup):
            r.step()
        r.tok.copy_(tok0)
        r.pos.copy_(pos0)
        _sync(r.device)
        t0 = time.perf_counter()
        ids = r.decode(n_tokens)
        _sync(r.device)
        dt = time.perf_counter() - t0
    finally:
        r.close()
    return {"tok_s": b * n_tokens / dt, "ms_per_token": dt / n_tokens * 1e3, "ids": ids.cpu()}
