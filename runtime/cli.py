"""`wina eval | generate`: run an annotated checkpoint."""

from __future__ import annotations

import json

import click

from wina.errors import one_line_errors
from wina.format import METHODS

from .wina_model import MODES, load

checkpoint = click.argument("checkpoint")
sparsity_opt = click.option("--sparsity", type=float, default=None, help="Target sparsity (default: checkpoint's).")
method_opt = click.option("--method", type=click.Choice(METHODS), default=None, help="Scoring rule (default: checkpoint's).")
dtype_opt = click.option("--dtype", default="auto", show_default=True, help="float32, bfloat16, float16 or auto.")
device_opt = click.option("--device", default="cpu", show_default=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run wina checkpoints: evaluate perplexity and sparsity, generate text."""


@main.command("eval")
@checkpoint
@click.option("--data", required=True, type=click.Path(), help="Evaluation text: .txt or .jsonl(.gz) with 'text'.")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Window length.")
@click.option("--max-windows", type=int, default=None, help="Score only N windows (the first N unless --spread).")
@click.option("--spread", is_flag=True, help="Space the --max-windows windows evenly over the text.")
@sparsity_opt
@method_opt
@click.option("--mode", type=click.Choice(MODES), default="paper", show_default=True, help="Which tokens run sparse.")
@dtype_opt
@device_opt
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
@one_line_errors
def eval_cmd(checkpoint, data, seq_len, max_windows, spread, sparsity, method, mode, dtype, device, as_json) -> None:
    """Perplexity of DATA and the sparsity actually measured, overall and per matrix type."""
    from .evaluate import perplexity, read_text

    model = load(checkpoint, sparsity=sparsity, method=method, mode=mode, device=device, dtype=dtype)
    result = perplexity(model, read_text(data), seq_len=seq_len, max_windows=max_windows, spread=spread)
    result["data"] = str(data)
    click.echo(
        f"{result['method']} target {result['target_sparsity']:.2f} ({result['mode']} mode): "
        f"perplexity {result['perplexity']:.3f} over {result['tokens_scored']} tokens, "
        f"measured sparsity {result['sparsity']:.3f}"
    )
    click.echo("  " + "  ".join(f"{k} {v:.3f}" for k, v in result["sparsity_by_matrix"].items()))
    if as_json:
        click.echo(json.dumps(result))


@main.command()
@checkpoint
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@sparsity_opt
@method_opt
@click.option("--sample/--greedy", default=False, show_default=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--top-p", type=float, default=0.9, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap PROMPT in the chat template if any.")
@click.option("--fast/--reference", default=True, show_default=True,
              help="Fast sparse kernels (Triton on a GPU, C++ on the CPU) or the reference path.")
@dtype_opt
@device_opt
@one_line_errors
def generate(checkpoint, prompt, max_new_tokens, sparsity, method, sample, temperature, top_p, seed, chat, fast,
             dtype, device):
    """Continue PROMPT: dense prefill, sparse decode."""
    model = load(checkpoint, sparsity=sparsity, method=method, mode="decode", device=device, dtype=dtype, fast=fast)
    tok = model.tokenizer
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_p=top_p, seed=seed
    )
    click.echo(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())


@main.command()
@click.argument("checkpoint", required=False)
@click.option("--synthetic", type=click.Choice(["llama3-8b"]), default=None,
              help="Random-weight model of this shape built on the device, instead of CHECKPOINT.")
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Sparsity of the end-to-end decode.")
@click.option("--tokens", type=int, default=32, show_default=True, help="Decode steps timed per run.")
@click.option("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads).")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="Interleaved dense/sparse decode runs; the best of each is reported.")
@click.option("--skip-hf", is_flag=True, help="Skip transformers' static-cache baseline.")
@click.option("--hf-compile/--hf-eager", default=None,
              help="transformers baseline with generate's automatic torch.compile (default on CUDA) or eager.")
@click.option("--skip-matrices", is_flag=True, help="Skip the per-matrix table and the per-layer timing.")
@dtype_opt
@device_opt
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
@one_line_errors
def bench(checkpoint, synthetic, sparsity, tokens, threads, rounds, skip_hf, hf_compile, skip_matrices, dtype,
          device, as_json) -> None:
    """Sparse vs dense vs ideal time per matrix and per decoder layer (GPU), and decode tok/s: own dense, own sparse,
    transformers static."""
    import torch

    from .bench import run_bench

    if threads:
        torch.set_num_threads(threads)
    if not checkpoint and not synthetic:
        raise click.UsageError("give a CHECKPOINT or --synthetic llama3-8b")
    result = run_bench(checkpoint, synthetic, device=device, dtype=dtype, sparsity=sparsity, tokens=tokens,
                       rounds=rounds, skip_hf=skip_hf, skip_matrices=skip_matrices, log=click.echo,
                       hf_compile=device.startswith("cuda") if hf_compile is None else hf_compile)
    if as_json:
        click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
