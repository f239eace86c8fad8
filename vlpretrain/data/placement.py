"""Which dp rank and microbatch trains each row of a planned global step (``data.balance``).

The plan (``step_plan.py``) fixes the step's rows; this only places them on (dp rank, microbatch) slots. Every
rank computes the same placement from the plan alone (its table and rows), the cost weights, dp and the micro
batch size: no communication, and resuming replays it exactly. The loss stays the global mean: each microbatch
back-propagates its summed token loss and the engine divides by the step's label-token count once, so any
placement gives the same loss and gradients up to the order of float sums. ``samples_digest`` hashes the
samples in draw order and does not change either.

``none``: rank r takes rows [r n, (r + 1) n) and its microbatches in order (n = rows / dp). ``rows``: rows go
longest first (by predicted cost) to the least loaded rank that still has room, every rank taking n rows, then
pairwise swaps between the heaviest and the lightest rank narrow the gap; then, within a rank, longest first
onto its microbatches of ``micro_batch_size`` rows (a pipeline is paced by its slowest microbatch) or, with
trimmed microbatches (``data.trim_padding``, no pipeline), rows of like length together (a microbatch is as wide
as its longest row: LLaVA's group-by-length, within one step). Within a microbatch rows keep their plan order,
and microbatches are ordered by their first row. Where the contiguous placement predicts a step no slower (a
text step: every row costs the same), it is kept.

Cost (``RowCost``; the trainer takes its weights from ``parallel.pipeline_cost.row_cost``, the planner's FLOP
model): a microbatch costs ``image`` per image its busiest first-stage rank encodes (max(1, ceil(n / tp)) of
its n images on an image step: a rank without images runs a blank one; none on a text step), plus per row
``position`` per token slot (dense decoder work: every row is seq_len long, or the microbatch's width when
trimmed) and ``attention`` per squared document length (per packed document with document-causal attention,
else the row's width squared). A dp rank's cost is the
sum of its microbatches'; the predicted step is the slowest rank's, and ``imbalance`` is slowest / mean.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from vlpretrain.config import Config
from vlpretrain.data.step_plan import StepPlan


@dataclass(frozen=True)
class RowCost:
    """Cost weights (any unit: only ratios matter). The default, images only, is the first-order model when the
    vision towers dominate; training passes the FLOP model's (``pipeline_cost.row_cost``)."""
    image: float = 1.0  # per image the busiest first-stage TP rank encodes
    position: float = 0.0  # per token slot of a row (seq_len per row, padded or packed)
    attention: float = 0.0  # per squared document length
    seq_len: int = 0  # rows' length (0: the attention term uses the documents' lengths only)
    per_document: bool = True  # attention within each packed document (document-causal), else over the row
    tp: int = 1  # images of a microbatch split over tp ranks (parallel.vision_split: images)
    width_multiple: int = 0  # > 0 (data.trim_padding): a microbatch is as wide as its longest row, rounded up


TRIM_MULTIPLE = 8  # data.trim_padding: microbatch widths are multiples of this (x tp): few distinct shapes


def width_multiple(cfg: Config) -> int:
    """What a microbatch's width is rounded up to under ``data.trim_padding`` (0: every row is seq_len wide).
    Pipelines keep seq_len: their stages exchange fixed shapes."""
    par = cfg.parallel
    return TRIM_MULTIPLE * par.tp if cfg.data.trim_padding and par.pp == 1 else 0


def microbatch_width(longest, seq_len: int, multiple: int):
    """Columns of a microbatch whose longest row holds ``longest`` tokens (``multiple`` from ``width_multiple``);
    an int, or an array of widths for an array of lengths."""
    if multiple <= 0:
        return seq_len
    width = np.maximum(multiple, -(-np.asarray(longest) // multiple) * multiple)
    if seq_len:
        width = np.minimum(seq_len, width)
    return int(width) if width.ndim == 0 else width


@dataclass(frozen=True)
class Placement:
    """``rows[r]``: the plan's row indices dp rank r trains, microbatch after microbatch (``mbs`` rows each)."""
    rows: list[list[int]]
    rank_cost: list[float]  # predicted cost of each dp rank
    rank_cost_contiguous: list[float]  # the same under the contiguous placement

    @property
    def imbalance(self) -> float:
        return _ratio(self.rank_cost)

    @property
    def imbalance_contiguous(self) -> float:
        return _ratio(self.rank_cost_contiguous)


def _ratio(costs: list[float]) -> float:
    mean = sum(costs) / len(costs) if costs else 0.0
    return max(costs) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class _Rows:
    """Per row of a plan: images, tokens, squared document lengths (attention), and its decoder cost alone."""
    images: np.ndarray
    tokens: np.ndarray
    squares: np.ndarray
    decoder: np.ndarray


def row_features(plan: StepPlan, cost: RowCost) -> _Rows:
    n = len(plan.rows)
    counts = np.fromiter((len(r) for r in plan.rows), np.int64, n)
    flat = np.fromiter((k for r in plan.rows for k in r), np.int64, int(counts.sum()))
    row_of = np.repeat(np.arange(n), counts)
    images = np.bincount(row_of, plan.table[flat, 4], minlength=n).astype(np.int64)
    tokens = np.bincount(row_of, plan.table[flat, 2], minlength=n).astype(np.int64)
    if cost.per_document or not cost.seq_len:
        squares = np.bincount(row_of, plan.table[flat, 2].astype(np.float64) ** 2, minlength=n)
    else:
        squares = np.full(n, float(cost.seq_len) ** 2)
    if cost.width_multiple:  # trimmed: a row alone costs its own (rounded) width
        width = microbatch_width(tokens, cost.seq_len, cost.width_multiple).astype(np.float64)
        if not cost.per_document:
            squares = width ** 2
        return _Rows(images, tokens, squares, cost.position * width + cost.attention * squares)
    return _Rows(images, tokens, squares, cost.position * cost.seq_len + cost.attention * squares)


def _costs(ranks: list[list[int]], mbs: int, rows: _Rows, cost: RowCost,
           image_step: bool) -> tuple[list[float], float]:
    """(each rank's cost, the costliest microbatch's) with ``mbs`` rows per microbatch in the ranks' order."""
    at = np.asarray(ranks, np.int64).reshape(len(ranks), -1, mbs)
    im = rows.images[at].sum(axis=2)
    encoded = np.maximum(1, -(-im // cost.tp)) if image_step else np.zeros_like(im)
    if cost.width_multiple:  # every row of a microbatch is as wide as its longest
        width = microbatch_width(rows.tokens[at].max(axis=2), cost.seq_len, cost.width_multiple).astype(np.float64)
        squares = rows.squares[at].sum(axis=2) if cost.per_document else mbs * width ** 2
        decoder = cost.position * mbs * width + cost.attention * squares
    else:
        decoder = rows.decoder[at].sum(axis=2)
    micro = cost.image * encoded + decoder
    return micro.sum(axis=1).tolist(), float(micro.max()) if micro.size else 0.0


def _longest_first(order: list[int], weight: np.ndarray, bins: int, capacity: int) -> list[list[int]]:
    """Items (in ``order``: heaviest first) to the lightest bin with room; ties to the lower bin."""
    heap = [(0.0, b) for b in range(bins)]
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        load, b = heapq.heappop(heap)
        out[b].append(i)
        if len(out[b]) < capacity:
            heapq.heappush(heap, (load + float(weight[i]), b))
    return out


def _swap_down(bins: list[list[int]], weight: np.ndarray, rounds: int) -> None:
    """Local search after longest first: swap one row of the heaviest bin with one of the lightest when that
    narrows their gap (the pair whose difference is nearest half the gap), up to ``rounds`` times. A swap
    never raises the heaviest load."""
    loads = np.array([float(weight[b].sum()) for b in bins])
    for _ in range(rounds):
        hi, lo = int(np.argmax(loads)), int(np.argmin(loads))
        gap = loads[hi] - loads[lo]
        if gap <= 0:
            return
        d = weight[bins[hi]][:, None] - weight[bins[lo]][None, :]
        score = np.where((d > 0) & (d < gap), np.abs(d - gap / 2), np.inf)
        k = int(np.argmin(score))
        if not np.isfinite(score.flat[k]):
            return
        a, b = divmod(k, len(bins[lo]))
        bins[hi][a], bins[lo][b] = bins[lo][b], bins[hi][a]
        loads[hi] -= d[a, b]
        loads[lo] += d[a, b]


def place(plan: StepPlan, dp: int, mbs: int, cost: RowCost, balance: str = "rows",
          pipelined: bool = True) -> Placement:
    """The rows of each dp rank in microbatch order (``balance``: "none" or "rows", see the module doc).
    ``pipelined``: the slowest microbatch paces a pipeline; without one (pp = 1) microbatches run one after
    another, so only the ranks' costs count (one rank, untrimmed and without TP: nothing to gain, the plan's order
    is kept; trimmed, rows of like length share a microbatch)."""
    n_rows = len(plan.rows)
    n = n_rows // dp
    rows = row_features(plan, cost)
    image_step = plan.modality != "text"
    # a row's share of its microbatch's cost (exact with one row per microbatch)
    images = rows.images
    encoded = np.maximum(1, -(-images // cost.tp)) if mbs == 1 and image_step else images / cost.tp
    weight = cost.image * encoded + rows.decoder

    def evaluate(ranks: list[list[int]]) -> tuple[list[float], float]:
        return _costs(ranks, mbs, rows, cost, image_step)

    contiguous = [list(range(r * n, (r + 1) * n)) for r in range(dp)]
    c_cost, c_mb = evaluate(contiguous)
    if balance == "none" or n_rows == 0:
        return Placement(contiguous, c_cost, c_cost)
    order = np.argsort(-weight, kind="stable").tolist()
    ranks = _longest_first(order, weight, dp, n)
    _swap_down(ranks, weight, 2 * dp)
    placed = []
    for mine in ranks:
        if cost.width_multiple:  # trimmed microbatches: rows of like length together (no pipeline to pace)
            mine = sorted(mine, key=lambda i: (-rows.tokens[i], i))
            micro = [sorted(mine[k:k + mbs]) for k in range(0, len(mine), mbs)]
        else:  # spread the heavy rows over the microbatches (the slowest paces a pipeline)
            mine = sorted(mine, key=lambda i: (-weight[i], i))
            micro = [sorted(m) for m in _longest_first(mine, weight, n // mbs, mbs)]
        placed.append([i for m in sorted(micro) for i in m])
    b_cost, b_mb = evaluate(placed)
    # (equal sums in another order may differ in the last bit: compare with a tolerance)
    faster = max(b_cost) < max(c_cost) * (1 - 1e-9)
    tie = not faster and max(b_cost) <= max(c_cost) * (1 + 1e-9)
    if not (faster or (pipelined and tie and b_mb < c_mb)):  # not predicted faster: keep the plan's order
        return Placement(contiguous, c_cost, c_cost)
    return Placement(placed, b_cost, c_cost)
