"""Which dp rank and microbatch trains each row of a planned global step (``data.balance``).

The plan (``step_plan.py``) fixes the step's rows; this only places them on (dp rank, microbatch) slots. Every
rank computes the same placement from the plan alone (its table and rows), the cost weights, dp and the micro
batch size: no communication, and resuming replays it exactly. The loss stays the global mean: each microbatch
back-propagates its summed token loss and the engine divides by the step's label-token count once, so any
placement gives the same loss and gradients up to the order of float sums. ``samples_digest`` hashes the
samples in draw order and does not change either.

``none``: rank r takes rows [r n, (r + 1) n) and its microbatches in order (n = rows / dp). ``rows``: where
the contiguous placement predicts a step no slower (a text step: every row costs the same) it is kept, and
otherwise the placement that predicts the fastest step under the layout's model of waiting (a placement
never predicts a slower step or a larger rank sum than contiguous shares):

- Without a pipeline (pp = 1), microbatch k of every dp rank runs in lockstep: FSDP gathers each unit's
  parameters and reduces its gradients with collectives that wait for every rank, so the first stage's units
  wait for the rank with the most images in microbatch k and each decoder block for the costliest decoder
  work. The predicted step is the sum over microbatches (slots) of the slot's largest vision cost plus its
  largest decoder cost. (Units kept gathered between microbatches, ``fsdp_reshard_after_forward: auto``, meet
  only in the first microbatch's forward and the last one's backward: the model then overstates the waits, and
  the ranks' sums, balanced too, count more.) Two cuts of the rows into microbatches are tried: rows of like
  length when trimmed (``data.trim_padding``: a microbatch is as wide as its longest row; LLaVA's
  group-by-length, within one step), and rows of like cost (longest first, then swaps between the heaviest and
  the lightest). Each is laid out slot by slot: the dp costliest microbatches become every rank's first, the
  next dp their second, ..., the costlier of a slot to the rank with the least so far; then a steepest-descent
  search swaps rows between microbatches while that lowers the predicted step (``_swap_search``). The better
  one wins (on a tie, the least padding), its slots in plan order. One rank, untrimmed and without TP: nothing
  to gain, the plan's order is kept.
- With a pipeline, each pipeline is paced by its slowest microbatch and the step by the slowest rank: rows go
  longest first to the least loaded rank that still has room, every rank taking n rows, pairwise swaps between
  the heaviest and the lightest rank narrow the gap, and within a rank the heavy rows go longest first onto
  its microbatches of ``micro_batch_size`` rows; the predicted step is the slowest rank's sum.

Within a microbatch rows keep their plan order. ``imbalance`` is the predicted step over the mean rank's sum (1:
no rank waits for another).

Cost (``RowCost``; the trainer takes its weights from ``parallel.pipeline_cost.row_cost``, the planner's FLOP
model): a microbatch's vision cost is ``image`` per image its busiest first-stage rank encodes (max(1,
ceil(n / tp)) of its n images on an image step: a rank without images runs a blank one; none on a text step);
its decoder cost is, per row, ``position`` per token slot (dense decoder work: every row is seq_len long, or
the microbatch's width when trimmed), ``attention`` per squared document length (per packed document with
document-causal attention, else the row's width squared) and ``label`` per supervised token (the vocabulary
head where it runs on those only). A dp rank's sum is its microbatches' costs.
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
    label: float = 0.0  # per supervised token (the vocabulary head on those only: train.logits_at_labels)


WORST_SLOTS = 4  # the lockstep search lowers these slots (most predicted wait first) in each round
SEARCH_ROUNDS = 16  # and at most this many swaps (a few ms for a step of hundreds of rows)
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
    step_cost: float  # the predicted step (module doc: lockstep without a pipeline, else the slowest rank)
    step_cost_contiguous: float

    @property
    def imbalance(self) -> float:
        return _ratio(self.step_cost, self.rank_cost)

    @property
    def imbalance_contiguous(self) -> float:
        return _ratio(self.step_cost_contiguous, self.rank_cost_contiguous)


def _ratio(step: float, costs: list[float]) -> float:
    """The predicted step over the mean rank's cost: 1 when no rank waits for another."""
    mean = sum(costs) / len(costs) if costs else 0.0
    return step / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class _Rows:
    """Per row of a plan: images, tokens, supervised tokens, squared document lengths (attention), and its
    decoder cost alone."""
    images: np.ndarray
    tokens: np.ndarray
    labels: np.ndarray
    squares: np.ndarray
    decoder: np.ndarray


def row_features(plan: StepPlan, cost: RowCost) -> _Rows:
    n = len(plan.rows)
    counts = np.fromiter((len(r) for r in plan.rows), np.int64, n)
    flat = np.fromiter((k for r in plan.rows for k in r), np.int64, int(counts.sum()))
    row_of = np.repeat(np.arange(n), counts)
    images = np.bincount(row_of, plan.table[flat, 4], minlength=n).astype(np.int64)
    tokens = np.bincount(row_of, plan.table[flat, 2], minlength=n).astype(np.int64)
    labels = np.bincount(row_of, plan.table[flat, 3], minlength=n).astype(np.float64)
    if cost.per_document or not cost.seq_len:
        squares = np.bincount(row_of, plan.table[flat, 2].astype(np.float64) ** 2, minlength=n)
    else:
        squares = np.full(n, float(cost.seq_len) ** 2)
    if cost.width_multiple:  # trimmed: a row alone costs its own (rounded) width
        width = microbatch_width(tokens, cost.seq_len, cost.width_multiple).astype(np.float64)
        if not cost.per_document:
            squares = width ** 2
        return _Rows(images, tokens, labels, squares,
                     cost.position * width + cost.attention * squares + cost.label * labels)
    return _Rows(images, tokens, labels, squares,
                 cost.position * cost.seq_len + cost.attention * squares + cost.label * labels)


def _micro_costs(at: np.ndarray, rows: _Rows, cost: RowCost, image_step: bool) -> tuple[np.ndarray, np.ndarray]:
    """(vision, decoder) cost of every microbatch of ``at`` (row indices, (..., ranks, microbatches, rows per
    microbatch)): two (..., ranks, microbatches) arrays."""
    im = rows.images[at].sum(axis=-1)
    encoded = np.maximum(1, -(-im // cost.tp)) if image_step else np.zeros_like(im)
    if cost.width_multiple:  # every row of a microbatch is as wide as its longest
        mbs = at.shape[-1]
        width = microbatch_width(rows.tokens[at].max(axis=-1), cost.seq_len, cost.width_multiple).astype(np.float64)
        squares = rows.squares[at].sum(axis=-1) if cost.per_document else mbs * width ** 2
        decoder = cost.position * mbs * width + cost.attention * squares + cost.label * rows.labels[at].sum(axis=-1)
    else:
        decoder = rows.decoder[at].sum(axis=-1)
    return cost.image * encoded.astype(np.float64), decoder


def _grid(ranks: list[list[int]], mbs: int) -> np.ndarray:
    """The ranks' rows as a (ranks, microbatches, mbs) array."""
    return np.asarray(ranks, np.int64).reshape(len(ranks), -1, mbs)


@dataclass(frozen=True)
class _Costs:
    rank: list[float]  # each rank's sum over its microbatches
    step: float  # the predicted step (module doc)
    slowest: float  # the costliest microbatch


def _costs(ranks: list[list[int]], mbs: int, rows: _Rows, cost: RowCost, image_step: bool,
           pipelined: bool) -> _Costs:
    vision, decoder = _micro_costs(_grid(ranks, mbs), rows, cost, image_step)
    micro = vision + decoder
    rank = micro.sum(axis=1)
    if micro.size == 0:
        return _Costs(rank.tolist(), 0.0, 0.0)
    # lockstep: microbatch k of every rank waits at each FSDP unit's collective, for the most vision work in the
    # first stage's units and for the most decoder work in each decoder block's
    step = rank.max() if pipelined else vision.max(axis=0).sum() + decoder.max(axis=0).sum()
    return _Costs(rank.tolist(), float(step), float(micro.max()))


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


def _slots(micro: list[list[int]], costs: np.ndarray, dp: int) -> list[list[int]]:
    """Microbatches onto dp ranks slot by slot: the dp costliest are every rank's first microbatch, the next dp
    their second, ...; within a slot the costlier microbatch goes to the rank with the least so far."""
    order = np.argsort(-costs, kind="stable")
    load, ranks = np.zeros(dp), [[] for _ in range(dp)]
    for s in range(0, len(micro), dp):
        for m, r in zip(order[s:s + dp], np.argsort(load, kind="stable")):
            ranks[r].extend(micro[m])
            load[r] += costs[m]
    return ranks


def _lockstep_candidates(rows: _Rows, weight: np.ndarray, dp: int, mbs: int, cost: RowCost,
                         image_step: bool) -> list[list[list[int]]]:
    """Placements for microbatches that run in lockstep across ranks (no pipeline): the step's rows cut into
    microbatches of like length when trimmed (the least padding), and of like cost (longest first, then swaps),
    each then laid out slot by slot (``_slots``)."""
    n_mb = len(weight) // mbs
    order = np.argsort(-weight, kind="stable").tolist()
    like_cost = _longest_first(order, weight, n_mb, mbs)
    _swap_down(like_cost, weight, 2 * n_mb)
    cuts = [like_cost]
    if cost.width_multiple:  # first: on a tie (e.g. one rank) the least padding wins
        by_length = sorted(range(len(weight)), key=lambda i: (-rows.tokens[i], i))
        cuts.insert(0, [by_length[k:k + mbs] for k in range(0, len(by_length), mbs)])
    out = []
    for micro in cuts:
        micro = [sorted(m) for m in micro]  # rows keep the plan's order within a microbatch
        vision, decoder = _micro_costs(_grid([[i for m in micro for i in m]], mbs), rows, cost, image_step)
        out.append(_slots(micro, (vision + decoder)[0], dp))
    return out


def _max_without(x: np.ndarray, top: np.ndarray, slot: np.ndarray, r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """For each swap: the largest of ``x[:, slot]`` (ranks x slots) over the ranks other than r1 and r2, from
    ``top`` (the ranks of each slot's three largest, largest first); -inf when no rank is left."""
    ids = top[:, slot]
    valid = (ids != r1) & (ids != r2)
    first = valid.argmax(axis=0)
    got = x[ids[first, np.arange(len(slot))], slot]
    return np.where(valid.any(axis=0), got, -np.inf)


def _slot_rows(parts: tuple[np.ndarray, np.ndarray], pick, ks: np.ndarray, mbs: int) -> np.ndarray:
    """(len(ks), 2 mbs): the row positions of the microbatch ``pick`` (np.argmax / np.argmin) selects in each
    slot of ``ks``, by vision cost and by decoder cost."""
    n_mb = parts[0].shape[1]
    r = np.stack([pick(x[:, ks], axis=0) for x in parts])  # (2, len(ks)) ranks
    return ((r * n_mb + ks)[..., None] * mbs + np.arange(mbs)).transpose(1, 0, 2).reshape(len(ks), -1)


def _swap_gains(flat: np.ndarray, p: np.ndarray, q: np.ndarray, parts: tuple[np.ndarray, np.ndarray], mbs: int,
                rows: _Rows, cost: RowCost, image_step: bool, limit: float) -> np.ndarray:
    """How much swapping the rows at positions p and q of ``flat`` changes the lockstep step (inf where a rank's
    sum would pass ``limit`` and its own): scored from the two microbatches a swap touches and each slot's three
    largest vision and decoder costs."""
    dp, n_mb = parts[0].shape
    total = (parts[0] + parts[1]).reshape(-1)
    rank_sum = total.reshape(dp, n_mb).sum(axis=1)
    a, b, idx = p // mbs, q // mbs, np.arange(len(p))
    ra, ka, rb, kb = a // n_mb, a % n_mb, b // n_mb, b % n_mb
    one = ka == kb  # both microbatches in one slot
    rows_a, rows_b = flat.reshape(-1, mbs)[a], flat.reshape(-1, mbs)[b]
    rows_a[idx, p % mbs], rows_b[idx, q % mbs] = flat[q], flat[p]
    new_a, new_b = _micro_costs(rows_a, rows, cost, image_step), _micro_costs(rows_b, rows, cost, image_step)
    gain = np.zeros(len(p))
    for x, xa, xb in zip(parts, new_a, new_b):
        top, peak = np.argsort(-x, axis=0, kind="stable")[:3], x.max(axis=0)
        in_a = np.maximum(_max_without(x, top, ka, ra, np.where(one, rb, ra)), xa)
        in_a = np.where(one, np.maximum(in_a, xb), in_a)
        in_b = np.maximum(_max_without(x, top, kb, rb, rb), xb)
        gain += in_a - peak[ka] + np.where(one, 0.0, in_b - peak[kb])
    grow_a, grow_b = new_a[0] + new_a[1] - total[a], new_b[0] + new_b[1] - total[b]
    both = ra == rb
    sum_a = rank_sum[ra] + grow_a + np.where(both, grow_b, 0.0)
    sum_b = rank_sum[rb] + grow_b + np.where(both, grow_a, 0.0)
    ok = (sum_a <= np.maximum(limit, rank_sum[ra])) & (sum_b <= np.maximum(limit, rank_sum[rb]))
    return np.where(ok, gain, np.inf)


def _swap_search(ranks: list[list[int]], mbs: int, rows: _Rows, cost: RowCost, image_step: bool,
                 limit: float, rounds: int) -> list[list[int]]:
    """Steepest descent on the lockstep step, at most ``rounds`` swaps. Each round swaps a row of a microbatch
    that sets one of the ``WORST_SLOTS`` worst slots' vision or decoder maximum with a row of the lightest
    microbatch of its own slot or of one of the ``WORST_SLOTS`` slots with the most room, whichever swap lowers
    the step most. No swap lifts a rank's sum above ``limit`` (or above its own)."""
    at = _grid(ranks, mbs).copy()
    n_mb = at.shape[1]
    flat = at.reshape(-1)  # a view: position (r n_mb + k) mbs + j holds row j of rank r's microbatch k
    for _ in range(rounds):
        parts = _micro_costs(at, rows, cost, image_step)  # (vision, decoder), each (ranks, slots)
        wait = parts[0].max(axis=0) + parts[1].max(axis=0) - (parts[0] + parts[1]).mean(axis=0)
        order = np.argsort(-wait, kind="stable")
        worst, roomy = order[:WORST_SLOTS], order[::-1][:WORST_SLOTS]
        mine = _slot_rows(parts, np.argmax, worst, mbs)  # (worst slots, 2 mbs)
        light = np.unique(_slot_rows(parts, np.argmin, roomy, mbs))
        partners = np.concatenate([np.broadcast_to(light, (len(worst), len(light))),
                                   _slot_rows(parts, np.argmin, worst, mbs)], axis=1)
        p = np.broadcast_to(mine[:, :, None], (*mine.shape, partners.shape[1])).reshape(-1)
        q = np.broadcast_to(partners[:, None, :], (*mine.shape, partners.shape[1])).reshape(-1)
        p, q = p[p // mbs != q // mbs], q[p // mbs != q // mbs]
        gain = _swap_gains(flat, p, q, parts, mbs, rows, cost, image_step, limit)
        if not len(gain) or gain.min() >= -1e-9 * float((parts[0] + parts[1]).sum()):
            break
        best = int(np.argmin(gain))
        flat[p[best]], flat[q[best]] = flat[q[best]], flat[p[best]]
    return [[i for m in mine for i in sorted(m)] for mine in at.reshape(-1, n_mb, mbs).tolist()]


def _slots_in_plan_order(ranks: list[list[int]], mbs: int) -> list[list[int]]:
    """The slots reordered by the first plan row they hold (the lockstep step does not depend on their order)."""
    at = _grid(ranks, mbs)
    order = np.argsort(at.min(axis=(0, 2)), kind="stable")
    return at[:, order].reshape(len(ranks), -1).tolist()


def _pipelined_candidate(rows: _Rows, weight: np.ndarray, dp: int, mbs: int) -> list[list[int]]:
    """Rows longest first onto the least loaded rank with room, swaps between the heaviest and the lightest rank,
    then within a rank the heavy rows spread over its microbatches (the slowest paces a pipeline)."""
    n = len(weight) // dp
    order = np.argsort(-weight, kind="stable").tolist()
    ranks = _longest_first(order, weight, dp, n)
    _swap_down(ranks, weight, 2 * dp)
    placed = []
    for mine in ranks:
        mine = sorted(mine, key=lambda i: (-weight[i], i))
        micro = [sorted(m) for m in _longest_first(mine, weight, n // mbs, mbs)]
        placed.append([i for m in sorted(micro) for i in m])
    return placed


def place(plan: StepPlan, dp: int, mbs: int, cost: RowCost, balance: str = "rows",
          pipelined: bool = True) -> Placement:
    """The rows of each dp rank in microbatch order (``balance``: "none" or "rows", see the module doc).
    ``pipelined``: a pipeline (pp > 1) is paced by the slowest rank and microbatch; without one (pp = 1) the
    ranks' microbatches run in lockstep (one rank, untrimmed and without TP: nothing to gain, the plan's order is
    kept; trimmed, rows of like length share a microbatch)."""
    n_rows = len(plan.rows)
    n = n_rows // dp
    rows = row_features(plan, cost)
    image_step = plan.modality != "text"
    # a row's share of its microbatch's cost (exact with one row per microbatch)
    images = rows.images
    encoded = np.maximum(1, -(-images // cost.tp)) if mbs == 1 and image_step else images / cost.tp
    weight = cost.image * encoded + rows.decoder

    def evaluate(ranks: list[list[int]]) -> _Costs:
        return _costs(ranks, mbs, rows, cost, image_step, pipelined)

    contiguous = [list(range(r * n, (r + 1) * n)) for r in range(dp)]
    c = evaluate(contiguous)
    keep = Placement(contiguous, c.rank, c.rank, c.step, c.step)
    if balance == "none" or n_rows == 0:
        return keep
    limit = max(c.rank) * (1 + 1e-9)
    if pipelined:
        best = _pipelined_candidate(rows, weight, dp, mbs)
    else:
        rounds = min(4 * n // mbs, SEARCH_ROUNDS)
        best = _slots_in_plan_order(min((_swap_search(r, mbs, rows, cost, image_step, limit, rounds)
                                         for r in _lockstep_candidates(rows, weight, dp, mbs, cost, image_step)),
                                        key=lambda r: evaluate(r).step), mbs)
    b = evaluate(best)
    if max(b.rank) > limit:  # never predicted slower under either wait: the slowest rank's sum or the step
        return keep
    # (equal sums in another order may differ in the last bit: compare with a tolerance)
    faster = b.step < c.step * (1 - 1e-9)
    tie = not faster and b.step <= c.step * (1 + 1e-9)
    if not (faster or (pipelined and tie and b.slowest < c.slowest)):  # not predicted faster: the plan's order
        return keep
    return Placement(best, b.rank, c.rank, b.step, c.step)
