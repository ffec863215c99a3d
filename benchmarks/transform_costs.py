"""Analytic extra parameters and decode FLOPs per token of each orthogonal transform (docs/RESULTS.md).

    python benchmarks/transform_costs.py

Dense reference: the 7 linears of every block (the matrices WINA/TEAL sparsify) and, separately, those plus the LM
head (everything a decode step reads besides one embedding row). One multiply-add = 2 FLOPs.
"""

from __future__ import annotations

SHAPES = {  # name: (hidden d, layers L, intermediate f, heads, kv heads, head_dim, vocab V, tied embeddings)
    "SmolLM2-135M": (576, 30, 1536, 9, 3, 64, 49152, True),
    "Llama-3-8B": (4096, 32, 14336, 32, 8, 128, 128256, False),
}


def costs(d, L, f, h, kv, hd, V, tied):
    q, kvd = h * hd, kv * hd
    linear = L * (d * q + 2 * d * kvd + q * d + 3 * d * f)
    head = V * d
    rows = {}
    shortcuts = (2 * L - 1) * d * d  # the last layer's MLP shortcut is the identity and is not stored
    narrowed = L * kvd * (d - kvd) if kvd < d else 0  # zero k_proj columns dropped
    rows["none"] = (0, 0, 0)
    rows["svd"] = (shortcuts, narrowed, head if tied else 0)
    rows["shared"] = (0, 0, head if tied else 0)
    return linear, head, rows


def main() -> None:
    print("| model | transform | shortcut params | − narrowed k | net extra params read / token | "
          "net extra decode FLOPs / token | vs 7 linears | vs linears + LM head | extra stored (untied LM head) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        linear, head, rows = costs(*shape)
        for t, (sc, nk, stored) in rows.items():
            read = sc - nk
            print(f"| {name} | {t} | {sc / 1e6:,.2f} M | {nk / 1e6:,.2f} M | {read / 1e6:,.2f} M | "
                  f"{2 * read / 1e6:,.1f} MFLOP | {100 * read / linear:.1f} % | {100 * read / (linear + head):.1f} % | "
                  f"{stored / 1e6:,.1f} M |")
        dense = f"7 linears {linear / 1e6:,.1f} M; + LM head {(linear + head) / 1e6:,.1f} M"
        print(f"| {name} | dense reference | | | {dense} "
              f"| {2 * linear / 1e6:,.0f} / {2 * (linear + head) / 1e6:,.0f} MFLOP | | | |")


if __name__ == "__main__":
    main()
