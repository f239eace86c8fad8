"""``data.balance: rows`` places a planned step's rows on (dp rank, microbatch) slots (``data/placement.py``,
issue 25): a permutation with fixed shapes, a function of the plan, never predicted slower than contiguous shares;
with a pipeline the ranks' sums are balanced, without one microbatch k of every rank runs in lockstep and the
placement is checked against the exhaustive optimum of that model, computed here from first principles.
(The same rows in every layout and exact resume: test_data_plan.py; equal losses and gradients:
test_parallel_equivalence.py.)"""
from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from vlpretrain.config import load_config
from vlpretrain.data.placement import RowCost, _swap_search, place, row_features
from vlpretrain.data.step_plan import StepPlan
from vlpretrain.models.flops import head_flops
from vlpretrain.parallel.pipeline_cost import row_cost

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def _plan(images: list[list[int]], modality: str = "multimodal", tokens: int = 10) -> StepPlan:
    """A step whose row r holds one sample per entry of ``images[r]`` (that many images each)."""
    table, rows = [], []
    for row in images:
        rows.append(list(range(len(table), len(table) + len(row))))
        table += [[0, len(table), tokens, tokens // 2, k] for k in row]
    return StepPlan(1, modality, np.array(table, np.int64).reshape(-1, 5), rows, {})


def _one_sample_rows(images: list[int], tokens: list[int]) -> StepPlan:
    table = [[0, i, t, t // 2, k] for i, (k, t) in enumerate(zip(images, tokens))]
    return StepPlan(1, "multimodal", np.array(table, np.int64), [[i] for i in range(len(images))], {})


def _brute_force_max(costs: list[float], dp: int) -> float:
    """The least possible slowest-rank cost with len(costs) / dp rows per rank (exhaustive)."""
    n, best = len(costs) // dp, float("inf")
    for perm in itertools.permutations(range(len(costs))):
        best = min(best, max(sum(costs[i] for i in perm[r * n:(r + 1) * n]) for r in range(dp)))
    return best


def _lockstep_oracle(at: np.ndarray, images, tokens, c: RowCost) -> tuple[np.ndarray, np.ndarray]:
    """(lockstep step, slowest rank's sum) of placements ``at`` (..., dp, microbatches, mbs) of one-sample rows,
    for ``per_document=False``: every microbatch waits for the slot's most vision work, then for its most decoder
    work (a blank image where a microbatch has none; rows as wide as seq_len, or trimmed to the longest)."""
    images, tokens = np.asarray(images)[at], np.asarray(tokens)[at]
    labels = (tokens // 2).sum(-1)  # _one_sample_rows supervises half of each row
    mbs = at.shape[-1]
    vision = c.image * np.maximum(1, -(-images.sum(-1) // c.tp))
    if c.width_multiple:
        m = c.width_multiple
        width = np.minimum(c.seq_len, np.maximum(m, -(-tokens.max(-1) // m) * m))
    else:
        width = np.full(vision.shape, c.seq_len)
    decoder = mbs * (c.position * width + c.attention * width ** 2.0) + c.label * labels
    step = vision.max(-2).sum(-1) + decoder.max(-2).sum(-1)
    return step, (vision + decoder).sum(-1).max(-1)


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "lockstep"])
def test_placement_is_a_balanced_permutation(pipelined):
    rng = random.Random(0)
    for _trial in range(300):
        dp, mbs, k = rng.choice([1, 2, 3, 4]), rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
        plan = _plan([[rng.randint(0, 4) for _ in range(rng.randint(1, 3))] for _ in range(dp * mbs * k)])
        cost = RowCost(image=1.0, position=rng.choice([0.0, 0.01]), attention=rng.choice([0.0, 1e-3]),
                       seq_len=64, tp=rng.choice([1, 2]), width_multiple=rng.choice([0, 8]))
        got = place(plan, dp, mbs, cost, pipelined=pipelined)
        assert place(plan, dp, mbs, cost, pipelined=pipelined) == got  # a function of its inputs only
        assert sorted(i for r in got.rows for i in r) == list(range(len(plan.rows)))
        assert all(len(r) == mbs * k for r in got.rows)
        # never predicted slower: neither the step nor the slowest rank's sum
        assert got.step_cost <= got.step_cost_contiguous * (1 + 1e-9)
        assert max(got.rank_cost) <= max(got.rank_cost_contiguous) * (1 + 1e-9)
        assert got.step_cost >= max(got.rank_cost) * (1 - 1e-9)  # no rank finishes after the step
        if not pipelined:  # slots in plan order: microbatch k of every rank, by the first row any of them holds
            assert (np.diff(np.asarray(got.rows).reshape(dp, k, mbs).min(axis=(0, 2))) > 0).all()
        none = place(plan, dp, mbs, cost, "none", pipelined=pipelined)
        assert none.rows == [list(range(r * mbs * k, (r + 1) * mbs * k)) for r in range(dp)]
        assert none.rank_cost == none.rank_cost_contiguous == got.rank_cost_contiguous
        assert none.step_cost == got.step_cost_contiguous


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "lockstep"])
def test_placement_spreads_images_and_keeps_text_steps(pipelined):
    # contiguous: rank 0 takes every image; balanced: 8 per rank, and within a rank 4 per microbatch
    plan = _plan([[4], [4], [4], [4], [0], [0], [0], [0]])
    got = place(plan, 2, 2, RowCost(), pipelined=pipelined)
    assert got.imbalance_contiguous == pytest.approx(16 / 9 if pipelined else (8 + 8) / 9)
    assert got.imbalance == 1.0
    for r in got.rows:
        assert [sum(plan.table[plan.rows[i][0], 4] for i in r[m:m + 2]) for m in (0, 2)] == [4, 4]
    # a text step (no vision work) or equal rows: the plan's order, contiguous shares
    assert place(_plan([[0]] * 8, "text"), 2, 2, RowCost(), pipelined=pipelined).rows == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert place(_plan([[2]] * 8), 4, 1, RowCost(), pipelined=pipelined).rows == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_pipelined_placement_near_the_optimum():
    # longest first against the exhaustive optimum (one row per microbatch: costs add up exactly)
    rng = random.Random(1)
    for _trial in range(40):
        images = [[rng.randint(0, 6)] for _ in range(6)]
        cost = RowCost(image=1.0, position=0.05, seq_len=10)
        got = place(_plan(images), 2, 1, cost)
        best = _brute_force_max([max(1, r[0]) + 0.5 for r in images], 2)
        assert max(got.rank_cost) <= best * 7 / 6 + 1e-9  # LPT's bound for two machines


def _random_case(rng: random.Random):
    dp, mbs, k = rng.choice([(2, 2, 2), (2, 1, 3), (3, 1, 2), (2, 3, 1), (2, 1, 4)])
    n = dp * mbs * k
    images, tokens = [rng.randint(0, 4) for _ in range(n)], [rng.randint(20, 96) for _ in range(n)]
    cost = RowCost(image=1.0, position=rng.choice([0.0, 0.01]), attention=rng.choice([0.0, 1e-4]), seq_len=96,
                   per_document=False, width_multiple=rng.choice([0, 8]), tp=rng.choice([1, 2]),
                   label=rng.choice([0.0, 0.02]))
    return dp, mbs, images, tokens, cost


def test_lockstep_placement_against_the_exhaustive_optimum():
    """Without a pipeline: the predicted step is the lockstep model's (checked against an oracle written here),
    and it is the least over every placement of the rows in most cases (never 20% above it, 2% on average)."""
    rng = random.Random(0)
    ratios = []
    for _trial in range(30):
        dp, mbs, images, tokens, cost = _random_case(rng)
        got = place(_one_sample_rows(images, tokens), dp, mbs, cost, pipelined=False)
        shape = (dp, -1, mbs)
        step, slowest = _lockstep_oracle(np.asarray(got.rows).reshape(shape), images, tokens, cost)
        assert got.step_cost == pytest.approx(float(step)) and max(got.rank_cost) == pytest.approx(float(slowest))
        c_step, c_slowest = _lockstep_oracle(np.arange(len(images)).reshape(shape), images, tokens, cost)
        assert got.step_cost_contiguous == pytest.approx(float(c_step))
        perms = np.array(list(itertools.permutations(range(len(images)))))
        perms = perms.reshape(-1, dp, len(images) // (dp * mbs), mbs)
        steps, slowest = _lockstep_oracle(perms, images, tokens, cost)
        best = steps[slowest <= c_slowest * (1 + 1e-9)].min()  # the placement never lets a rank's sum grow
        ratios.append(got.step_cost / best)
    assert min(ratios) >= 1 - 1e-9
    optimal = sum(r < 1 + 1e-9 for r in ratios)
    assert max(ratios) < 1.2 and np.mean(ratios) < 1.02 and optimal >= 0.8 * len(ratios), sorted(ratios)


def test_swap_search_only_takes_swaps_that_lower_the_step():
    """Each swap is scored from the two microbatches it touches and the slots' largest costs; the full model
    (the oracle) must agree that every round lowered the step, and that no rank's sum passed the limit."""
    rng = random.Random(3)
    for _trial in range(60):
        dp, mbs, images, tokens, cost = _random_case(rng)
        plan = _one_sample_rows(images, tokens)
        rows = row_features(plan, cost)
        start = np.arange(len(images)).reshape(dp, -1).tolist()
        shape = (dp, -1, mbs)
        prev, limit = _lockstep_oracle(np.asarray(start).reshape(shape), images, tokens, cost)
        placed = start
        for rounds in range(1, 6):
            got = _swap_search(start, mbs, rows, cost, True, float(limit), rounds)
            step, slowest = _lockstep_oracle(np.asarray(got).reshape(shape), images, tokens, cost)
            assert sorted(i for r in got for i in r) == list(range(len(images)))
            assert slowest <= limit * (1 + 1e-9)
            if got == placed:  # no improving swap left: the search has stopped
                assert step == pytest.approx(prev)
                break
            assert step < prev * (1 - 1e-9), (rounds, step, prev)
            prev, placed = step, got


def test_trimmed_microbatches_group_rows_of_like_length():
    """data.trim_padding: a microbatch is as wide as its longest row, so rows of like length go together, even on
    one rank (the plan's order otherwise); the predicted cost counts the widths; untrimmed, the order is kept."""
    rng = random.Random(2)
    lengths = [rng.randint(20, 96) for _ in range(16)]
    table = [[0, i, n, n // 2, 1] for i, n in enumerate(lengths)]
    plan = StepPlan(1, "multimodal", np.array(table, np.int64), [[i] for i in range(16)], {})
    trim = RowCost(image=1.0, position=0.1, attention=1e-3, seq_len=96, per_document=False, width_multiple=8)
    for dp in (1, 2):
        got = place(plan, dp, 4, trim, pipelined=False)
        assert sorted(i for r in got.rows for i in r) == list(range(16))
        assert max(got.rank_cost) < max(got.rank_cost_contiguous)
        for ranks in got.rows:
            micro = [sorted(lengths[i] for i in ranks[k:k + 4]) for k in range(0, len(ranks), 4)]
            # like lengths together: no microbatch's rows interleave with another's
            for a, b in itertools.combinations(micro, 2):
                assert a[-1] <= b[0] or b[-1] <= a[0], micro
    untrimmed = RowCost(image=1.0, position=0.1, attention=1e-3, seq_len=96, per_document=False)
    assert place(plan, 1, 4, untrimmed, pipelined=False).rows == [list(range(16))]


def test_row_cost_counts_the_head_where_it_runs():
    """train.logits_at_labels (no tp, no pp): the head projects supervised tokens only, so its cost moves from
    every token slot to every supervised token; with a pipeline or TP it stays per slot."""
    at = row_cost(load_config(TINY / "stage3.yaml", ["parallel.dp=1"]))
    every = row_cost(load_config(TINY / "stage3.yaml", ["parallel.dp=1", "train.logits_at_labels=false"]))
    piped = row_cost(load_config(TINY / "stage3.yaml", ["parallel.dp=1", "parallel.pp=2"]))
    assert every.label == piped.label == 0.0 and at.label > 0
    assert at.position + at.label == pytest.approx(every.position) and piped.position == pytest.approx(every.position)
    cfg = load_config(TINY / "stage3.yaml")
    assert at.label == pytest.approx(head_flops(cfg.model, 1) * 3)  # forward + backward
    plan = _one_sample_rows([1, 0], [40, 40])  # equal rows but for their supervised tokens (20 each here)
    plan.table[1, 3] = 5
    rows = row_features(plan, at)
    assert rows.decoder[0] - rows.decoder[1] == pytest.approx(15 * at.label)
