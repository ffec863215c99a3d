"""Greedy per-matrix sparsity allocation: for one decoder block, the error-minimising path from dense to sparse.

Starting from every matrix dense, each step raises the sparsity of the one linear (q, k, v, o, gate, up, down)
whose increase adds the least squared error to the block's output on calibration hidden states. A step drops the
same number of weights whatever the matrix (matrix step = `step` x block parameters / matrix parameters, from the
weight shapes), so every step raises the block's parameter-weighted sparsity by `step`. The whole path, up to
`max_sparsity`, is resampled on a fixed grid of block sparsities (`allocation_grid()`) and stored in the checkpoint;
the runtime reads the row of any target and turns each matrix sparsity into a threshold with the quantile tables.

The search treats the block as a black box: it only sets per-linear thresholds (`SparseLinear.set_threshold`) and
calls `block(x, cos, sin, pos, None, True)`, so it works for every architecture, method and weight transform. It
stays affordable by memoising every linear: a candidate step recomputes only the linears whose input or threshold
changed (an MLP-side candidate never recomputes the attention projections, for instance).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from wina.archs import LINEARS
from wina.format import ALLOCATION_GRID_STEP, MAX_SPARSITY

from .thresholds import threshold_at

# Highest sparsity the search gives one matrix (the quantile tables end at 0.999).
MATRIX_CAP = 0.99


def allocation_grid() -> torch.Tensor:
    """Block sparsities at which the allocation tables are tabulated: 0, 0.005, ..., MAX_SPARSITY."""
    n = int(round(MAX_SPARSITY / ALLOCATION_GRID_STEP)) + 1
    return (torch.arange(n, dtype=torch.float64) * ALLOCATION_GRID_STEP).float()


@dataclass
class SearchStats:
    steps: int = 0
    evaluations: int = 0  # candidate block forwards
    linear_flops: float = 0.0  # multiply-adds x 2 of the linears actually recomputed
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time (all threads)
    trajectory: list = field(default_factory=list)  # [(block sparsity, [7 matrix sparsities])]


class _Memo:
    """Per-linear cache of recent (threshold, input) -> output, so an unchanged linear is never recomputed."""

    def __init__(self, lin, stats: SearchStats, size: int = 4) -> None:
        self.lin, self.stats, self.size = lin, stats, size
        self.entries: list[tuple[float, torch.Tensor, torch.Tensor]] = []
        self.forward = lin.forward  # the module's own forward (reference op or a registered kernel)

    def __call__(self, x: torch.Tensor, sparse=None) -> torch.Tensor:
        t = self.lin.threshold_value
        for i, (et, ex, ey) in enumerate(self.entries):
            if et == t and ex.shape == x.shape and torch.equal(ex, x):
                if i:
                    self.entries.insert(0, self.entries.pop(i))
                return ey
        y = self.forward(x, sparse)
        self.stats.linear_flops += 2.0 * x.numel() / x.shape[-1] * self.lin.in_features * self.lin.out_features
        self.entries.insert(0, (t, x, y))
        del self.entries[self.size :]
        return y


@torch.no_grad()
def greedy_allocation(
    block,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    quantiles: dict[str, torch.Tensor],
    levels: torch.Tensor,
    method: str,
    col_norms: dict[str, torch.Tensor] | None = None,
    step: float = 0.01,
    max_sparsity: float = MAX_SPARSITY,
    lazy: bool = True,
    refresh_every: int = 10,
    progress: bool = True,
    desc: str = "greedy allocation",
) -> tuple[torch.Tensor, SearchStats]:
    """Greedy path of one block; returns (table f32 [len(allocation_grid()), 7] in LINEARS order, stats).

    `x` [batch, seq, hidden]: the block's (dense-model) input hidden states; `cos`/`sin` the rotary tables of its
    positions; `quantiles[short]`: the `method` score-quantile table of each linear at `levels`; `col_norms[short]`
    the column norms (WINA scores; the block's own `col_norm` buffers are used when omitted).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    stats = SearchStats()
    linears = block.linears()
    use_norm = method == "wina"
    saved = {s: (lin.threshold_value, lin.use_col_norm, lin.col_norm) for s, lin in linears.items()}
    params = torch.tensor([float(linears[s].weight.numel()) for s in LINEARS], dtype=torch.float64)
    total = float(params.sum())
    deltas = step * total / params  # matrix sparsity step: the same number of weights for every matrix
    pos = torch.arange(x.shape[1], device=x.device)

    def set_level(short: str, s: float) -> None:
        linears[short].set_threshold(threshold_at(levels, quantiles[short], s) if s > 0 else 0.0, use_norm)

    def sq_error() -> float:
        stats.evaluations += 1
        out = block(x, cos, sin, pos, None, True)
        return float((out - ref).double().pow(2).sum())

    memos = {s: _Memo(lin, stats) for s, lin in linears.items()}
    try:
        for short, lin in linears.items():
            if col_norms is not None:
                lin.col_norm = col_norms[short].to(x.device, torch.float32)
            lin.set_threshold(0.0, use_norm)
            lin.forward = memos[short]
        ref = block(x, cos, sin, pos, None, None)
        cur = torch.zeros(len(LINEARS), dtype=torch.float64)
        err = 0.0
        path = [(0.0, cur.clone())]
        n_steps = int(round(max_sparsity / step))
        bar = tqdm(total=n_steps, desc=desc, unit="step", leave=False, disable=not progress)
        block_s = 0.0
        # Lazy greedy (Minoux): the cost of raising matrix j, computed at an earlier state, is kept until j is the
        # cheapest; it is then recomputed at the current state and taken only if it is still the cheapest. Costs
        # that other matrices barely change (the common case: errors of different matrices add nearly
        # independently) are thus not recomputed every step; all are refreshed every `refresh_every` steps.
        costs: list[float | None] = [None] * len(LINEARS)
        trials: dict[int, tuple[float, float]] = {}  # j -> (new level, block error) at the current state

        def evaluate(j: int) -> None:
            new = min(float(cur[j] + deltas[j]), MATRIX_CAP)
            set_level(LINEARS[j], new)
            e = sq_error()
            set_level(LINEARS[j], float(cur[j]))
            # Error added per weight dropped (steps are equal unless a matrix hits the cap).
            costs[j] = (e - err) / (float(params[j]) * (new - float(cur[j])))
            trials[j] = (new, e)

        while block_s < max_sparsity - 1e-9:
            open_ = [j for j in range(len(LINEARS)) if cur[j] < MATRIX_CAP - 1e-12]
            if not open_:
                break
            if not lazy or stats.steps % refresh_every == 0:
                for j in open_:
                    costs[j] = None
            trials.clear()
            while True:
                for j in open_:
                    if costs[j] is None:
                        evaluate(j)
                j = min(open_, key=lambda k: (costs[k], k))
                if j in trials:
                    break
                costs[j] = None  # stale: recompute at this state, then choose again
            new, err = trials[j]
            cur[j] = new
            costs[j] = None  # its next step starts from a new level
            set_level(LINEARS[j], new)
            block_s = float((cur * params).sum() / total)
            path.append((block_s, cur.clone()))
            stats.steps += 1
            bar.update(1)
        bar.close()
    finally:
        for short, lin in linears.items():
            lin.__dict__.pop("forward", None)
            thr, norm_flag, norm = saved[short]
            lin.col_norm = norm
            lin.set_threshold(thr, norm_flag)
    stats.trajectory = [(s, c.tolist()) for s, c in path]
    stats.seconds, stats.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return resample(path, allocation_grid()), stats


def resample(path: list[tuple[float, torch.Tensor]], grid: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear path (block sparsity -> 7 matrix sparsities) read at the grid's block sparsities.

    Between two path points only one matrix moves, so linear interpolation keeps every row's parameter-weighted
    mean equal to its grid value. Beyond the path's end the last point is repeated (never reached in practice).
    """
    xs = torch.tensor([p[0] for p in path], dtype=torch.float64)
    ys = torch.stack([p[1] for p in path]).double()
    return interp_rows(grid.double(), xs, ys).float()


def interp_rows(s: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Rows of `ys` [n, k] (tabulated at increasing `xs` [n]) linearly interpolated at each of `s` [m] -> [m, k]."""
    s = s.double().clamp(float(xs[0]), float(xs[-1]))
    i = (torch.searchsorted(xs.contiguous(), s, right=True) - 1).clamp(0, xs.numel() - 2)
    x0, x1 = xs[i], xs[i + 1]
    frac = torch.where(x1 > x0, (s - x0) / (x1 - x0).clamp_min(1e-30), torch.zeros_like(s)).clamp(0, 1)
    return ys[i] + (ys[i + 1] - ys[i]) * frac[:, None]


def matrix_sparsities(table: torch.Tensor, grid: torch.Tensor, sparsity: float) -> dict[str, float]:
    """Runtime side: the 7 matrix sparsities of a block at block (= model) sparsity `sparsity`."""
    row = interp_rows(torch.tensor([float(sparsity)]), grid.double(), table.double())[0]
    return {short: float(row[j]) for j, short in enumerate(LINEARS)}
