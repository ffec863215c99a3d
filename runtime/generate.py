"""Autoregressive decoding with a static KV cache: dense (or paper-mode) prefill, sparse decode steps."""

from __future__ import annotations

import torch

from .wina_model import WinaModel


def sample(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row from last-position logits [batch, vocab]."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: WinaModel,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Greedy or sampled continuation of equal-length prompts `input_ids` [batch, seq]; stops at EOS per row."""
    dec = model.decoder
    ids = input_ids.to(model.device)
    b, t = ids.shape
    if eos_token_id is None and model.generation_config is not None:
        eos_token_id = model.generation_config.eos_token_id
    eos = torch.tensor(
        [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
        device=ids.device,
    )
    if not do_sample:
        return _greedy(model, ids, max_new_tokens, eos)
    gen = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
    dec.setup_cache(b, t + max_new_tokens)
    try:
        logits = dec(ids, pos=torch.arange(t, device=ids.device), sparse=model.prefill_spec(ids))[:, -1]
        out = [ids]
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            tok = _mark_eos(sample(logits, do_sample, temperature, top_k, top_p, gen), done, eos)
            out.append(tok[:, None])
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            pos = torch.tensor([t + step], device=ids.device)
            logits = dec(tok[:, None], pos=pos, sparse=True)[:, -1]
        return torch.cat(out, dim=1)
    finally:
        dec.clear_cache()


def _mark_eos(tok: torch.Tensor, done: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Finished rows repeat EOS; rows that emit an EOS token are marked in `done` (in place)."""
    if eos.numel():
        tok = torch.where(done, eos[0], tok)
        done |= torch.isin(tok, eos)
    return tok


def _greedy(model: WinaModel, ids: torch.Tensor, max_new_tokens: int, eos: torch.Tensor) -> torch.Tensor:
    """Greedy decoding through the `DecodeRunner`: on CUDA every step is one CUDA-graph replay (fast kernels,
    argmax and position update captured together), on CPU the same step runs eagerly."""
    from .decode import DecodeRunner

    b, t = ids.shape
    runner = DecodeRunner(model.decoder, b, t + max_new_tokens, sparse=True)
    try:
        tok = runner.prefill(ids, sparse=model.prefill_spec(ids))
        out = [ids]
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            out.append(_mark_eos(tok[:, 0].clone(), done, eos)[:, None])
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            tok = runner.step()
        return torch.cat(out, dim=1)
    finally:
        runner.close()
