"""The data path plans from sample sizes and each rank builds only its share (issues 10 and 11):

* each TP rank decodes only the images it encodes (``image_split``): the union over TP ranks is the full set;
* first fit has one implementation (``packing.FirstFit``), equal to a plain scan;
* sizes are stored in the shard index / side indexes, keyed by the tokenizer, and rebuilt when it changes;
* planning reads no text: a rank reads only its own rows' samples; DataLoader workers receive only their steps;
* a sample that no longer reads as it was sized is masked in place, deterministically;
* the vectorised planner (block choices, look-ahead draws, table-driven Feistel rounds, record-based first fit)
  gives exactly the plans of a plain one-sample-at-a-time reference, on random sizes and bad samples;
* ``data.balance: rows`` (placement itself: test_placement.py) gives the same rows and step totals in every
  layout, and is exact on resume (issue 25).
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpretrain.config import load_config
from vlpretrain.data.loader import DataPipeline, image_share
from vlpretrain.data.packing import FirstFit
from vlpretrain.data.sample_order import FeistelPermutation, SamplePlanner, WeightedChooser
from vlpretrain.data.shard_index import index_path
from vlpretrain.data.sizes import SizeTable
from vlpretrain.data.sources import JsonlSource, ShardSource
from vlpretrain.data.step_plan import MAX_CONSECUTIVE_BAD, StepPlanner
from vlpretrain.data.tokenizer import TextTokenizer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
MM = "data.language_ratio={start: 0.0, end: 0.0, warmup_steps: 0, shape: linear}"  # multimodal steps only


def _cfg(demo_dir: Path, *overrides: str):
    return load_config(TINY / "stage2.yaml", [
        f"data.root={demo_dir}", "train.init_from=", "train.eval_file=", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.seq_len=256", "data.num_workers=0", MM, *overrides])


def _count_decodes(pipe: DataPipeline) -> list[int]:
    calls = [0]
    for src in pipe.sources:
        orig = src.image

        def counted(i, j, record, _orig=orig):
            calls[0] += 1
            return _orig(i, j, record)
        src.image = counted
    return calls


def test_image_share_matches_the_engine():
    from vlpretrain.parallel.vision_split import image_share as engine_share

    for n in range(0, 23):
        for tp in (1, 2, 3, 4, 8):
            bounds = [image_share(n, tp, t) for t in range(tp)]
            assert bounds == [engine_share(n, tp, t) for t in range(tp)]
            assert sum(e - s for s, e in bounds) == n


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_each_tp_rank_decodes_only_its_share(demo_dir, tokenizer, packing):
    cfg = _cfg(demo_dir, f"data.packing={str(packing).lower()}")
    full = DataPipeline(cfg, tokenizer)
    ranks = [DataPipeline(cfg, tokenizer, image_split=(t, 2)) for t in range(2)]
    calls_full, calls = _count_decodes(full), [_count_decodes(p) for p in ranks]
    for _ in range(3):
        want, got = next(full), [next(p) for p in ranks]
        before = [c[0] for c in calls]
        n_step = 0
        for m, mb in enumerate(want.microbatches):
            parts = [g.microbatches[m] for g in got]
            assert all(torch.equal(p.tokens, mb.tokens) and p.images.shape == mb.images.shape for p in parts)
            per_row = ((mb.tokens == tokenizer.image_id).sum(1) // cfg.model.image_tokens).tolist()
            flat = [(r, j) for r, k in enumerate(per_row) for j in range(k)]  # placeholder order
            n_step += len(flat)
            for t, p in enumerate(parts):
                lo, hi = image_share(len(flat), 2, t)
                for f, (r, j) in enumerate(flat):
                    if lo <= f < hi:
                        assert torch.equal(p.images[r, j], mb.images[r, j]) and bool(p.images[r, j].any())
                    else:
                        assert not bool(p.images[r, j].any())  # not decoded: zeros
            # the union of the ranks' images is the full set
            assert torch.equal(parts[0].images + parts[1].images, mb.images)
        assert n_step == want.num_images > 0
        del before
    assert calls[0][0] + calls[1][0] == calls_full[0] > 0
    assert calls[0][0] < calls_full[0] and calls[1][0] < calls_full[0]


def test_first_fit_equals_a_scan():
    rng = random.Random(0)
    for trial in range(200):
        cap, rows = rng.randint(1, 64), rng.randint(1, 40)
        fit, free, bins = FirstFit(cap, rows), [], []
        for k in range(rng.randint(0, 120)):
            n = rng.randint(1, cap)
            for r, room in enumerate(free):  # the policy written out: first open row with room, else a new one
                if n <= room:
                    free[r] -= n
                    bins[r].append(k)
                    want = r
                    break
            else:
                want = len(free) if len(free) < rows else None
                if want is not None:
                    free.append(cap - n)
                    bins.append([k])
            assert fit.place(n, k) == want, trial
            if want is None:
                break
        assert fit.rows == bins and fit.free == free


def _scan_fit(sizes: list[int], cap: int, rows: int) -> tuple[list[int], list[list[int]], list[int]]:
    """First fit written out: the first open row with room, else a new one; stop at the first that fits none."""
    free, bins, out = [], [], []
    for k, n in enumerate(sizes):
        for r, room in enumerate(free):
            if n <= room:
                free[r] -= n
                bins[r].append(k)
                out.append(r)
                break
        else:
            if len(free) == rows:
                break
            free.append(cap - n)
            bins.append([k])
            out.append(len(free) - 1)
    return out, bins, free


@pytest.mark.parametrize("shape", ["random", "ties", "long-gaps"])
def test_first_fit_many_equals_a_scan(shape):
    """``place_many`` (records, binary search, long stretches vectorised) against the scan, with many equal
    rooms and long runs of nearly full rows before a roomy one."""
    rng = random.Random(shape)
    for trial in range(60):
        cap, rows = rng.randint(1, 400), rng.randint(1, 300)
        if shape == "random":
            sizes = [rng.randint(0, cap) for _ in range(rng.randint(0, 3000))]
        elif shape == "ties":
            sizes = [rng.choice([cap // 2 + 1, max(cap // 7, 1), rng.randint(1, max(cap // 3, 1))])
                     for _ in range(2000)]
        else:
            sizes = [max(cap - 50, 1) if k < rows - 1 else rng.randint(1, cap) for k in range(rows)]
            sizes += [rng.randint(1, 80) for _ in range(2000)]
        sizes = [min(n, cap) for n in sizes]
        want = _scan_fit(sizes, cap, rows)
        fit = FirstFit(cap, rows)
        got = fit.place_many(sizes)
        assert (got, fit.rows, fit.free) == want, trial
        one = FirstFit(cap, rows)
        assert [one.place(n, k) for k, n in enumerate(sizes[:len(got) + 1])] == got + [None] * (len(got) < len(sizes))


@pytest.mark.parametrize("n", [1, 2, 5, 588, 1024, 1025, 70_000])
def test_feistel_many_equals_one_at_a_time(n):
    perm = FeistelPermutation(n, 7, 3, 2)
    idx = np.arange(n) if n <= 5000 else np.random.default_rng(0).integers(0, n, 5000)
    assert perm.many(idx).tolist() == [perm(int(i)) for i in idx]
    big = FeistelPermutation(2 ** 33 + 5, 1, 2, 3)  # halves beyond the tables: hashed per element
    idx = np.array([0, 1, 2 ** 32, 2 ** 33 + 4])
    assert big.many(idx).tolist() == [big(int(i)) for i in idx]
    with pytest.raises(IndexError):
        perm.many(np.array([n]))


@pytest.mark.parametrize("weights", [[1.0], [15.2, 11.1, 3.0, 4.0], [0.001, 1.0, 5.0], [1.0, 10.0, 100.0, 100.0]])
def test_chooser_take_equals_next(weights):
    a, b = WeightedChooser(weights), WeightedChooser(weights)
    want = [a.next() for _ in range(3000)]
    got = b.take(1000)
    tail = b.take(700)
    b.give_back(tail)  # undone exactly: the counts are the whole state
    assert got + b.take(2000) == want and a.counts == b.counts


def _feistel(n: int, key: tuple, i: int) -> int:
    """The keyed Feistel permutation written out (4 blake2b rounds, cycle walking)."""
    bits = max(2, max(n - 1, 1).bit_length())
    bits += bits % 2
    half = bits // 2
    mask = (1 << half) - 1
    digest = hashlib.sha256(repr((n,) + key).encode()).digest()
    keys = [int.from_bytes(digest[8 * r:8 * r + 8], "little") for r in range(4)]
    x = i
    while True:
        left, right = x >> half, x & mask
        for k in keys:
            h = hashlib.blake2b((right ^ k).to_bytes(16, "little"), digest_size=8).digest()
            left, right = right, left ^ (int.from_bytes(h, "little") & mask)
        x = (left << half) | right
        if x < n:
            return x


class _ReferencePlanner:
    """The planning policy one sample at a time (what ``StepPlanner`` did before it was vectorised): each slot
    draws a source (``WeightedChooser.next``), then that source's draws in its per-epoch shuffled order until
    one is usable; packed, first fit by a scan until a sample fits no row (it waits for the modality's next
    step)."""

    def __init__(self, p: StepPlanner):
        self.p, self.n = p, [len(s) for s in p.sources]
        self.sp = SamplePlanner(self.n, [s.modality for s in p.sources], [s.cfg.weight for s in p.sources],
                                p.cfg.train.seed, p.schedule, p.cfg.data.group_by_modality)
        self.carry: dict = {}
        self.bad_total = {s.name: 0 for s in p.sources}

    def _fill(self, source: int, bad: dict) -> tuple:
        name = self.p.sources[source].name
        for _ in range(MAX_CONSECUTIVE_BAD):
            c = self.sp.counters[source]
            self.sp.counters[source] += 1
            index = _feistel(self.n[source], (self.sp.seed, source, c // self.n[source]), c % self.n[source])
            t = self.p.tables[source]
            tokens = int(t.text[index]) + int(t.images[index]) * self.p.image_tokens
            if index not in t.reasons and tokens <= self.p.seq_len:
                return source, index, tokens, int(t.labels[index]), int(t.images[index])
            bad[name] = bad.get(name, 0) + 1
            self.bad_total[name] += 1
        raise RuntimeError("stuck")

    def plan(self):
        step, modality = self.sp.next_step()
        bad: dict = {}
        rows = self.p.cfg.train.global_batch_size
        if not self.p.cfg.data.packing:
            slots = [self._fill(self.sp.next_source(modality), bad) for _ in range(rows)]
            return step, modality, slots, [[k] for k in range(rows)], bad
        slots, free, bins = [], [], []
        while True:
            s = self.carry.pop(modality, None) or self._fill(self.sp.next_source(modality), bad)
            r = next((r for r, room in enumerate(free) if s[2] <= room), None)
            if r is None and len(free) < rows:
                r = len(free)
                free.append(self.p.seq_len)
                bins.append([])
            if r is None:
                self.carry[modality] = s
                return step, modality, slots, bins, bad
            free[r] -= s[2]
            bins[r].append(len(slots))
            slots.append(s)


def _random_tables(p: StepPlanner, rng: np.random.Generator, bad_share: float) -> None:
    for i, src in enumerate(p.sources):
        n = len(src)
        short = rng.random(n) < 0.8  # mostly short samples, some long ones, a few longer than seq_len
        text = np.where(short, rng.integers(1, p.seq_len // 8 + 2, n), rng.integers(1, p.seq_len + 40, n))
        images = rng.integers(0, 3, n) if src.modality != "text" else np.zeros(n, np.int64)
        labels = rng.integers(0, text + 1)
        share = bad_share if i % 2 else bad_share / 4
        reasons = {int(j): "bad" for j in np.flatnonzero(rng.random(n) < share)}
        p.tables[i] = SizeTable(text.astype(np.int32), labels.astype(np.int32), images.astype(np.int32), reasons)


@pytest.mark.parametrize("packing,group,rows,seq,bad_share", [
    (True, True, 8, 256, 0.1), (True, True, 48, 512, 0.3), (True, False, 16, 384, 0.05),
    (False, True, 16, 256, 0.2), (False, False, 8, 300, 0.6)])
def test_planner_equals_a_plain_reference(demo_dir, tokenizer, packing, group, rows, seq, bad_share):
    """Random sizes and bad samples: every step's slots, rows, skips and state equal the reference's."""
    cfg = _cfg(demo_dir, f"data.packing={str(packing).lower()}", f"data.group_by_modality={str(group).lower()}",
               f"train.global_batch_size={rows}", "train.micro_batch_size=1", f"train.seq_len={seq}",
               "data.language_ratio={start: 0.9, end: 0.4, warmup_steps: 10, shape: linear}")
    planner = StepPlanner(cfg, tokenizer)
    _random_tables(planner, np.random.default_rng(rows * seq), bad_share)
    ref = _ReferencePlanner(planner)
    for _ in range(25):
        step, modality, slots, bins, bad = ref.plan()
        got = planner.plan()
        assert (got.step, got.modality) == (step, modality)
        assert [tuple(s) for s in got.table.tolist()] == slots, step
        assert got.rows == bins, step
        assert list(got.totals["bad_samples"].items()) == list(bad.items())
        assert got.totals["num_label_tokens"] == sum(s[3] for s in slots)
        keys = "\n".join(planner.sources[s[0]].key(s[1]) for s in slots)
        assert got.totals["samples_digest"] == hashlib.sha1(keys.encode()).hexdigest()[:16]
        assert planner.planner.state_dict() == ref.sp.state_dict()
        assert planner.bad_total == ref.bad_total
        assert {m: (s.source, s.index) for m, s in planner.carry.items()} == \
            {m: s[:2] for m, s in ref.carry.items()}
    assert sum(ref.bad_total.values()) > 0 and max(ref.sp.epochs()) >= 1  # skips and epoch ends were met


def test_planner_stops_where_the_reference_meets_a_dead_source(demo_dir, tokenizer):
    """A source whose samples turn all bad: both fail at the same step, after the same plans."""
    cfg = _cfg(demo_dir, "data.packing=true", "train.global_batch_size=16", "train.micro_batch_size=1",
               "data.language_ratio={start: 0.5, end: 0.5, warmup_steps: 0, shape: linear}")
    planner = StepPlanner(cfg, tokenizer)
    _random_tables(planner, np.random.default_rng(1), 0.05)
    ref = _ReferencePlanner(planner)
    for _ in range(3):
        assert [tuple(s) for s in planner.plan().table.tolist()] == ref.plan()[2]
    t = planner.tables[1]  # captions: all bad from now on (both read the planner's tables)
    planner.tables[1] = SizeTable(t.text, t.labels, t.images, {j: "gone" for j in range(len(t))})
    for _ in range(4):
        try:
            want = ref.plan()[2]
        except RuntimeError:
            with pytest.raises(RuntimeError, match="consecutive bad samples in source 'captions'"):
                planner.plan()
            assert planner.planner.step == ref.sp.step
            return
        assert [tuple(s) for s in planner.plan().table.tolist()] == want
    raise AssertionError("the reference never met the dead source")


def _copy_demo(demo_dir: Path, dst: Path) -> Path:
    shutil.copytree(demo_dir, dst, ignore=shutil.ignore_patterns("*.sizes.json", "*.sizes.npz"))
    for p in dst.rglob("*.idx.json"):  # start without sizes
        index = json.loads(p.read_text())
        index.pop("sizes", None)
        p.write_text(json.dumps(index))
    return dst


def test_sizes_are_stored_keyed_by_the_tokenizer_and_rebuilt(demo_dir, tmp_path):
    root = _copy_demo(demo_dir, tmp_path / "demo")
    tok = TextTokenizer(root / "tokenizer.json")
    cfg = _cfg(root, "data.packing=true")
    a = DataPipeline(cfg, tok)
    shards = [s for s in a.sources if isinstance(s, ShardSource)]
    jsonl = [s for s in a.sources if isinstance(s, JsonlSource)]
    assert shards and all("sizes" in json.loads(index_path(p).read_text()) for s in shards for p in s.reader.paths)
    assert all(Path(f"{s.path}.sizes.json").is_file() for s in jsonl)
    ref = [next(a).samples_digest for _ in range(3)]
    # planning reads stored sizes, not text: no record is read while planning
    b = DataPipeline(cfg, tok)
    for s in b.sources:
        s.record = s.tokens = None  # any read would fail
    assert [b.plans.plan().totals["samples_digest"] for _ in range(3)] == ref
    # another tokenizer (same vocabulary, other file) -> other key -> recomputed and stored again
    data = json.loads((root / "tokenizer.json").read_text())
    data["normalizer"] = None if data.get("normalizer") else {"type": "NFC"}
    (root / "tok2.json").write_text(json.dumps(data))
    tok2 = TextTokenizer(root / "tok2.json")
    assert tok2.fingerprint != tok.fingerprint
    key1 = json.loads(index_path(shards[0].reader.paths[0]).read_text())["sizes"]["key"]
    DataPipeline(cfg, tok2)
    key2 = json.loads(index_path(shards[0].reader.paths[0]).read_text())["sizes"]["key"]
    assert key1 != key2


def test_a_rank_reads_only_its_rows(demo_dir, tokenizer):
    cfg = _cfg(demo_dir, "data.packing=true", "train.global_batch_size=8", "train.micro_batch_size=1")
    reads = []
    pipes = [DataPipeline(cfg, tokenizer, dp_rank=r, dp_size=4, load_images=False) for r in range(4)]
    for r, p in enumerate(pipes):
        for s in p.sources:
            orig = s.record

            def rec(i, _orig=orig, _r=r, _name=s.name):
                reads.append((_r, _name, i))
                return _orig(i)
            s.record = rec
    steps = [[next(p) for p in pipes] for _ in range(2)]
    n_samples = sum(s[0].num_samples for s in steps)
    assert len(reads) == n_samples  # every sample read once, by one rank
    for r in range(4):
        mine = sum(1 for x in reads if x[0] == r)
        assert 0 < mine < n_samples


def test_workers_get_only_their_steps(demo_dir, tokenizer):
    cfg = _cfg(demo_dir, "data.packing=true", "data.num_workers=2",
               "data.language_ratio={start: 0.5, end: 0.5, warmup_steps: 0, shape: linear}")
    ref = DataPipeline(cfg, tokenizer)
    want = [next(ref) for _ in range(4)]
    pipe = DataPipeline(cfg, tokenizer)
    it = pipe.steps()
    got = [next(it) for _ in range(4)]
    del it
    for w, g in zip(want, got):
        assert (w.step, w.samples_digest, w.num_label_tokens) == (g.step, g.samples_digest, g.num_label_tokens)
        assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(w.microbatches, g.microbatches))


def test_sample_changed_after_sizing_is_masked_in_place(demo_dir, tokenizer, tmp_path):
    root = _copy_demo(demo_dir, tmp_path / "demo")
    cfg = _cfg(root, "data.packing=true")
    ref = DataPipeline(cfg, tokenizer)
    want = next(ref)
    pipe = DataPipeline(cfg, tokenizer)
    plan = pipe.plans.plan()
    victim = next(s for s in plan.slots if s.images > 0)
    src = pipe.sources[victim.source]
    orig = src.record
    src.record = lambda i: {"text": "changed", "images": []} if i == victim.index else orig(i)
    got = pipe.build(plan)
    assert got.bad_reads == 1 and got.samples_digest == want.samples_digest
    for a, b in zip(want.microbatches, got.microbatches):
        assert torch.equal((a.tokens == tokenizer.image_id).sum(1), (b.tokens == tokenizer.image_id).sum(1))
        assert torch.equal(a.doc_ids, b.doc_ids)
    n_labels = sum(int((mb.labels != -100).sum()) for mb in got.microbatches)
    assert n_labels == want.num_label_tokens - victim.labels


def test_data_tools_index_stores_sizes_ahead(demo_dir, tmp_path, capsys):
    from data_tools.__main__ import main

    root = _copy_demo(demo_dir, tmp_path / "demo")
    shard = next((root / "shards").glob("captions-*.tar"))
    assert "sizes" not in json.loads(index_path(shard).read_text())
    assert main(["index", "--config", str(TINY / "stage2.yaml"), f"data.root={root}"]) == 0
    assert "sizes" in json.loads(index_path(shard).read_text())
    assert (root / "corpus" / "text.sizes.npz").is_file()
    assert "captions:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- placement of rows (data.balance)
# (the placement's own tests: test_placement.py)


def _rows_of(batches) -> list[tuple]:
    """Every row of one step over all ranks: (tokens, labels, its images) as bytes, sorted."""
    out = []
    for b in batches:
        for mb in b.microbatches:
            for r in range(mb.tokens.shape[0]):
                n = int((mb.tokens[r] == 2).sum()) // 36
                imgs = mb.images[r, :n].numpy().tobytes() if mb.images is not None else b""
                out.append((mb.tokens[r].numpy().tobytes(), mb.labels[r].numpy().tobytes(), imgs))
    return sorted(out)


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_balanced_rows_are_the_same_step_in_any_layout_and_resume(demo_dir, tokenizer, packing):
    from vlpretrain.parallel.pipeline_cost import row_cost

    half = "data.language_ratio={start: 0.5, end: 0.5, warmup_steps: 0, shape: linear}"
    cfg = _cfg(demo_dir, f"data.packing={str(packing).lower()}", "train.micro_batch_size=1", half,
               "data.balance=none")
    bal = _cfg(demo_dir, f"data.packing={str(packing).lower()}", "train.micro_batch_size=1", half)
    ref = DataPipeline(cfg, tokenizer)
    want = [next(ref) for _ in range(6)]
    pipes = {dp: [DataPipeline(bal, tokenizer, dp_rank=r, dp_size=dp, row_cost=row_cost(bal)) for r in range(dp)]
             for dp in (1, 2, 4)}
    got = {dp: [[next(p) for p in ps] for _ in range(6)] for dp, ps in pipes.items()}
    moved = 0
    for s, w in enumerate(want):
        for dp, steps in got.items():
            step = steps[s]
            for b in step:  # the step's global fields (plan totals) do not depend on the placement
                assert (b.samples_digest, b.num_label_tokens, b.num_images, b.data_state) == \
                       (w.samples_digest, w.num_label_tokens, w.num_images, w.data_state)
                assert b.rank_cost_imbalance <= b.rank_cost_imbalance_contiguous + 1e-9
            assert _rows_of(step) == _rows_of([w]), (dp, s)
            assert len({b.rank_cost_imbalance for b in step}) == 1
        order = [mb.tokens for b in got[4][s] for mb in b.microbatches]
        moved += not all(torch.equal(a, b) for a, b in zip(order, [mb.tokens for mb in w.microbatches]))
    if packing:  # rows moved, predicted faster (unpacked demo rows alternate 1 and 3 images: already balanced)
        assert moved > 0
        assert any(b[0].rank_cost_imbalance < b[0].rank_cost_imbalance_contiguous for b in got[4])
    # resume after step 3, in the same layout (the same tensors) and in another one (the same rows)
    for dp, resumed_dp in ((4, 4), (4, 2)):
        state = got[dp][2][0].data_state
        again = [DataPipeline(bal, tokenizer, dp_rank=r, dp_size=resumed_dp, row_cost=row_cost(bal), state=state)
                 for r in range(resumed_dp)]
        for s in range(3, 6):
            step = [next(p) for p in again]
            assert _rows_of(step) == _rows_of(got[dp][s])
            if resumed_dp == dp:
                for b, ref_b in zip(step, got[dp][s]):
                    assert all(torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
                               for x, y in zip(b.microbatches, ref_b.microbatches))
