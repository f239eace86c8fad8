"""Data-pipeline requirements of the roadmap, checked end to end on the demo data (scale 0.05):

1. one modality per global step across all dp ranks and microbatches (``group_by_modality``), "mixed" otherwise;
2. the realised language share tracks the schedule: |language steps so far - sum of r| < 1 at every step;
3. sources blend by weight deterministically (``WeightedChooser``), ``FeistelPermutation`` is a keyed bijection,
   a source's draws visit every sample exactly once per epoch;
4. the global sample sequence does not depend on the layout (dp = 1, 2, 4; data.num_workers = 0, 2);
5. resuming mid-epoch (also at another dp size) continues exactly as the uninterrupted run;
6. bad data never stops training, and each kind is handled as documented (blank image, skip + count, fail fast);
7. the step metrics are present and exact.
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.config import ConfigError, LanguageRatioConfig, load_config
from vlpretrain.data.encoding import IGNORE
from vlpretrain.data.loader import DataPipeline
from vlpretrain.data.sample_order import FeistelPermutation, ModalitySchedule, SamplePlanner, WeightedChooser
from vlpretrain.data.shard_index import index_path
from vlpretrain.data.shards import ShardWriter

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
GBS, MBS, SEQ = 8, 2, 128
IMAGE_TOKENS = 36  # tiny model: (48 / 8) ** 2
IMAGE_SIZE = 128  # tiny model: SAM's resolution
PH = "<image_placeholder>"
HALF = "data.language_ratio={start: 0.5, end: 0.5, warmup_steps: 0, shape: linear}"  # text, mm, text, mm, ...
GLOBAL_FIELDS = ("step", "modality", "num_label_tokens", "num_tokens", "num_images", "language_ratio_target",
                 "language_ratio_realized", "samples_digest", "source_counts", "bad_samples", "data_state")


def _cfg(demo_dir: Path, *overrides: str):
    """The tiny stage-2 config on the demo data: global batch 8 of micro batches of 2, seq_len 128, unpacked,
    language share 0.5 (steps alternate text / multimodal) unless overridden; rows in contiguous shares
    (``data.balance: none``: rank r's rows are the dp = 1 step's r-th share; balanced placement:
    tests/test_data_plan.py)."""
    return load_config(TINY / "stage2.yaml", [
        f"data.root={demo_dir}", "train.init_from=", "train.eval_file=", f"train.global_batch_size={GBS}",
        f"train.micro_batch_size={MBS}", f"train.seq_len={SEQ}", "data.packing=false", "data.num_workers=0",
        "data.balance=none", HALF, *overrides])


def _merge(batches: list) -> dict:
    """One global step seen by all dp ranks (rank order): the global fields (checked equal on every rank), the
    concatenated microbatches and the images that failed to decode, summed over ranks."""
    first = batches[0]
    for b in batches[1:]:
        for f in GLOBAL_FIELDS:
            assert getattr(b, f) == getattr(first, f), (f, first.step)
    out = {f: getattr(first, f) for f in GLOBAL_FIELDS}
    out["micro"] = [m for b in batches for m in b.microbatches]
    out["micro_per_rank"] = [len(b.microbatches) for b in batches]
    out["bad_images"] = sum(b.bad_images for b in batches)
    return out


def _run(cfg, tok, dp: int, n_steps: int, state: dict | None = None, load_images: bool = True) -> list[dict]:
    """``n_steps`` global steps of a dp layout, every rank's pipeline built in this process."""
    pipes = [DataPipeline(cfg, tok, dp_rank=r, dp_size=dp, load_images=load_images, state=state) for r in range(dp)]
    return [_merge([next(p) for p in pipes]) for _ in range(n_steps)]


def _run_workers(cfg, tok, n_steps: int, state: dict | None = None) -> list[dict]:
    pipe = DataPipeline(cfg, tok, state=state)
    it = pipe.steps()
    try:
        return [_merge([next(it)]) for _ in range(n_steps)]
    finally:
        del it  # shuts the worker processes down


def _same_micro(a, b) -> bool:
    if not (torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)):
        return False
    for x, y in ((a.positions, b.positions), (a.doc_ids, b.doc_ids)):  # packed rows only
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    if (a.images is None) != (b.images is None):
        return False
    return a.images is None or (a.images.shape == b.images.shape and torch.equal(a.images, b.images))


def _assert_same_steps(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for f in GLOBAL_FIELDS + ("bad_images",):
            assert g[f] == w[f], (f, w["step"], g[f], w[f])
        assert len(g["micro"]) == len(w["micro"]) == GBS // MBS
        for i, (a, b) in enumerate(zip(g["micro"], w["micro"])):
            assert _same_micro(a, b), f"step {w['step']}: microbatch {i} differs"


def _names(cfg, modality: str) -> set[str]:
    return {s.name for s in cfg.data.sources if s.modality == modality}


def _image_counts(mb, image_id: int) -> list[int]:
    """Images per row, from the image-token runs."""
    n = (mb.tokens == image_id).sum(dim=1)
    assert bool((n % IMAGE_TOKENS == 0).all())
    return (n // IMAGE_TOKENS).tolist()


pytestmark = pytest.mark.usefixtures("one_thread")  # collating small tensors: one intra-op thread is faster


@pytest.fixture(scope="module")
def references(demo_dir, tokenizer):
    """``get(packing)``: 6 steps at dp=1 (text, multimodal, text, ...), images decoded, unpacked or packed (stage 2
    packs): what every other layout must reproduce. Computed once per module."""
    cache: dict[bool, list[dict]] = {}

    def get(packing: bool = False) -> list[dict]:
        if packing not in cache:
            cache[packing] = _run(_cfg(demo_dir, f"data.packing={str(packing).lower()}"), tokenizer, dp=1, n_steps=6)
        return cache[packing]

    return get


@pytest.fixture
def reference(references) -> list[dict]:
    return references(False)


# ---------------------------------------------------------------------------------------------------------------
# 1. one modality per global step


def _check_one_modality(steps: list[dict], cfg, tok) -> None:
    """Every step draws from one modality's sources only; text steps carry no image (None) and no image token,
    multimodal steps give every microbatch of every rank an image tensor holding each row's images in order."""
    text, mm = _names(cfg, "text"), _names(cfg, "multimodal")
    for s in steps:
        assert len(s["micro"]) == GBS // MBS
        if s["modality"] == "text":
            assert set(s["source_counts"]) <= text and s["num_images"] == 0
            for mb in s["micro"]:
                assert mb.images is None
                assert not bool((mb.tokens == tok.image_id).any())
        else:
            assert s["modality"] == "multimodal" and set(s["source_counts"]) <= mm
            n_images = 0
            for mb in s["micro"]:
                per_row = _image_counts(mb, tok.image_id)
                n_images += sum(per_row)
                assert isinstance(mb.images, torch.Tensor), s["step"]
                assert tuple(mb.images.shape) == (MBS, max(per_row), 3, IMAGE_SIZE, IMAGE_SIZE)
                for row, k in enumerate(per_row):  # decoded demo images, then zero padding slots
                    assert all(bool(mb.images[row, j].any()) for j in range(k))
                    assert not bool(mb.images[row, k:].any())
            assert n_images == s["num_images"] > 0


def test_every_step_is_one_modality_across_ranks_and_microbatches(demo_dir, tokenizer, references):
    cfg = _cfg(demo_dir)
    steps = _run(cfg, tokenizer, dp=2, n_steps=8)
    # r = 0.5 everywhere: the rounded cumulative target alternates, starting with a language step
    assert [s["modality"] for s in steps] == ["text", "multimodal"] * 4
    assert all(sum(s["source_counts"].values()) == GBS and s["micro_per_rank"] == [2, 2] for s in steps)
    _check_one_modality(steps, cfg, tokenizer)
    _check_one_modality(references(True), _cfg(demo_dir, "data.packing=true"), tokenizer)  # packed rows too
    # a rank without the vision encoder gets no image tensor at all
    for s in _run(cfg, tokenizer, dp=1, n_steps=2, load_images=False):
        assert all(mb.images is None for mb in s["micro"])
        assert s["modality"] == "text" or any(bool((mb.tokens == tokenizer.image_id).any()) for mb in s["micro"])


def test_ungrouped_steps_mix_text_and_multimodal_sources(demo_dir, tokenizer):
    cfg = _cfg(demo_dir, "data.group_by_modality=false")
    text, mm = _names(cfg, "text"), _names(cfg, "multimodal")
    weights = {s.name: s.weight for s in cfg.data.sources}
    steps = _run(cfg, tokenizer, dp=1, n_steps=6, load_images=False)
    counts = dict.fromkeys(weights, 0)
    for k, s in enumerate(steps, 1):
        assert s["modality"] == "mixed"
        assert set(s["source_counts"]) & text and set(s["source_counts"]) & mm, s["source_counts"]
        for name, c in s["source_counts"].items():
            counts[name] += c
        # the language share of the samples follows data.language_ratio (0.5 here), as grouped steps' share does
        n_text = sum(counts[n] for n in text)
        assert abs(n_text - k * GBS * 0.5) <= 0.5, (k, n_text)
        assert s["language_ratio_target"] == 0.5 and s["language_ratio_realized"] == n_text / (k * GBS)
        for group in (text, mm):  # within a modality, every source keeps its weight share
            total, w = sum(counts[n] for n in group), sum(weights[n] for n in group)
            for name in group:
                assert abs(counts[name] - total * weights[name] / w) <= 1.0, (k, name, counts)
    # with images loaded, a mixed step's microbatches carry an image tensor; text rows' slots stay zero
    for s in _run(cfg, tokenizer, dp=1, n_steps=2):
        for mb in s["micro"]:
            assert isinstance(mb.images, torch.Tensor)
            for row, k in enumerate(_image_counts(mb, tokenizer.image_id)):
                assert not bool(mb.images[row, k:].any())
                assert all(bool(mb.images[row, j].any()) for j in range(k))


# ---------------------------------------------------------------------------------------------------------------
# 2. realised language share


@pytest.mark.parametrize("shape", ["linear", "cosine", "step"])
def test_realised_language_share_tracks_the_schedule(shape, record_property):
    lr = LanguageRatioConfig(start=1.0, end=0.7, warmup_steps=1000, shape=shape)
    sched = ModalitySchedule(lr)
    planner = SamplePlanner([10, 10], ["text", "multimodal"], [1.0, 1.0], 0, sched, True)
    reference_sched = ModalitySchedule(lr)  # only used for r(t): independent of the planner's cache
    cum, lang, worst, worst_step = 0.0, 0, 0.0, 0
    for step in range(1, 3001):
        cum += reference_sched.ratio(step)
        m = planner.modality(step)
        assert m in ("text", "multimodal")
        lang += m == "text"
        dev = lang - cum
        assert abs(dev) < 1.0, (step, lang, cum)
        assert sched.deviation(step) == pytest.approx(dev, abs=1e-9)
        assert sched.realized(step) == lang / step
        if abs(dev) > worst:
            worst, worst_step = abs(dev), step
    # the shares themselves: 1.0 during the warm-up start, 0.7 at the end
    assert reference_sched.ratio(1) == 1.0 and reference_sched.ratio(1001) == pytest.approx(0.7, abs=1e-12)
    assert lang == pytest.approx(cum, abs=1.0)
    record_property("worst_language_deviation", worst)
    print(f"\n[{shape}] worst |language steps - sum r| over 3000 steps: {worst:.6f} (step {worst_step}); "
          f"realised share {lang / 3000:.6f}, target mean {cum / 3000:.6f}")


# ---------------------------------------------------------------------------------------------------------------
# 3. weighted blending, permutations, epochs


@pytest.mark.parametrize("weights", [
    [15.2, 11.1, 3.0, 4.0],  # the tiny/7B multimodal blend
    [15.2, 11.1, 3.0, 4.0, 70.0],  # the same plus text (group_by_modality: false)
    [70.0, 33.3], [1.0, 1.0, 1.0], [0.001, 1.0, 5.0], [1.0],
    [1.0, 10.0, 100.0, 100.0], [1.0, 3.0, 5.0, 40.0, 60.0],  # beyond smooth round-robin's reach
], ids=lambda w: "-".join(f"{x:g}" for x in w))
def test_weighted_chooser_keeps_every_source_within_one_draw(weights):
    share = [w / sum(weights) for w in weights]
    seqs = []
    for _ in range(2):  # deterministic
        chooser, counts, seq = WeightedChooser(weights), [0] * len(weights), []
        for k in range(1, 3001):
            i = chooser.next()
            seq.append(i)
            counts[i] += 1
            for j, c in enumerate(counts):
                assert abs(c - k * share[j]) <= 1.0 + 1e-9, (k, j, c, k * share[j])
        seqs.append(seq)
    assert seqs[0] == seqs[1]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 1000, 1024, 1025])
def test_feistel_permutation_is_a_keyed_bijection(n):
    keys = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (7,)]
    orders = {}
    for key in keys:
        perm = FeistelPermutation(n, *key)
        order = [perm(i) for i in range(n)]
        assert sorted(order) == list(range(n)), key
        assert order == [FeistelPermutation(n, *key)(i) for i in range(n)]  # deterministic
        for bad in (-1, n):
            with pytest.raises(IndexError):
                perm(bad)
        orders[key] = tuple(order)
    if n >= 7:  # 7! = 5040 orders: different keys must give different orders (and not the identity)
        assert len(set(orders.values())) == len(keys), n
        assert all(o != tuple(range(n)) for o in orders.values())


def test_source_draws_cover_each_sample_once_per_epoch():
    sizes = [1, 7, 13, 1000]
    planner = SamplePlanner(sizes, ["multimodal"] * 4, [1.0] * 4, 3, ModalitySchedule(LanguageRatioConfig()), True)
    draws: dict[int, list] = {s: [] for s in range(4)}
    while any(len(draws[s]) < 3 * n for s, n in enumerate(sizes)):  # the sources' draws interleaved
        for s, n in enumerate(sizes):
            if len(draws[s]) < 3 * n:
                draws[s].append(planner.draw(s))
    for s, n in enumerate(sizes):
        d = draws[s]
        assert [x.counter for x in d] == list(range(3 * n)) and all(x.source == s for x in d)
        epochs = [[x.index for x in d[e * n:(e + 1) * n]] for e in range(3)]
        for e in epochs:
            assert sorted(e) == list(range(n)), s
        if n >= 7:
            assert epochs[0] != epochs[1] != epochs[2], s  # a fresh order every epoch
        # the same as a planner that draws only this source: other sources' draws do not disturb it
        alone = SamplePlanner(sizes, ["multimodal"] * 4, [1.0] * 4, 3, ModalitySchedule(LanguageRatioConfig()), True)
        assert [alone.draw(s).index for _ in range(3 * n)] == [x.index for x in d]
    assert planner.epochs() == [3, 3, 3, 3]


def test_pipeline_visits_every_text_chunk_once_per_epoch(demo_dir, tokenizer):
    cfg = _cfg(demo_dir, "data.language_ratio={start: 1.0, end: 1.0, warmup_steps: 0}")
    pipe = DataPipeline(cfg, tokenizer, load_images=False)
    text = next(i for i, s in enumerate(pipe.sources) if s.modality == "text")
    n = len(pipe.sources[text])
    assert n >= GBS
    keys = []
    while len(keys) < 2 * n:
        plan = pipe.plans.plan()
        assert plan.modality == "text" and not plan.totals["bad_samples"]
        keys += [pipe.sources[s.source].key(s.index) for s in plan.slots]
    everything = sorted(pipe.sources[text].key(i) for i in range(n))
    assert sorted(keys[:n]) == everything and sorted(keys[n:2 * n]) == everything
    assert keys[:n] != keys[n:2 * n]


# ---------------------------------------------------------------------------------------------------------------
# 4. layout independence


def test_reference_run_is_non_trivial(references):
    for packing in (False, True):
        ref = references(packing)
        assert [s["step"] for s in ref] == [1, 2, 3, 4, 5, 6]
        assert [s["modality"] for s in ref] == ["text", "multimodal"] * 3
        assert any(s["bad_samples"] for s in ref)  # interleaved documents longer than 128 tokens get skipped
        assert len({s["samples_digest"] for s in ref}) == 6
        assert all(len(s["micro"]) == GBS // MBS for s in ref)
    assert all(sum(s["source_counts"].values()) == GBS for s in references(False))
    assert any(sum(s["source_counts"].values()) > GBS for s in references(True))  # several samples per row


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("dp", [2, 4])
def test_global_sequence_is_independent_of_dp(demo_dir, tokenizer, references, dp, packing):
    steps = _run(_cfg(demo_dir, f"data.packing={str(packing).lower()}"), tokenizer, dp=dp, n_steps=6)
    assert all(s["micro_per_rank"] == [GBS // MBS // dp] * dp for s in steps)
    _assert_same_steps(steps, references(packing))


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_global_sequence_is_independent_of_workers(demo_dir, tokenizer, references, packing):
    pk = f"data.packing={str(packing).lower()}"
    _assert_same_steps(_run_workers(_cfg(demo_dir, pk), tokenizer, 6), references(packing))  # steps(), 0 workers
    _assert_same_steps(_run_workers(_cfg(demo_dir, pk, "data.num_workers=2"), tokenizer, 6), references(packing))


# ---------------------------------------------------------------------------------------------------------------
# 5. resume


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_resume_mid_epoch_equals_uninterrupted(demo_dir, tokenizer, references, packing):
    pk = f"data.packing={str(packing).lower()}"
    cfg, reference = _cfg(demo_dir, pk), references(packing)
    pipe = DataPipeline(cfg, tokenizer)
    third = [next(pipe) for _ in range(3)][-1]
    state = pipe.state_dict()
    assert state == third.data_state == reference[2]["data_state"]
    assert any(0 < e["counter"] < e["size"] for e in state["sources"].values())  # mid-epoch
    state = json.loads(json.dumps(state))  # as a checkpoint stores it
    _assert_same_steps(_run(cfg, tokenizer, dp=1, n_steps=3, state=state), reference[3:6])
    # saved at dp=1, resumed at dp=2
    _assert_same_steps(_run(cfg, tokenizer, dp=2, n_steps=3, state=state), reference[3:6])
    # resumed with worker processes
    _assert_same_steps(_run_workers(_cfg(demo_dir, pk, "data.num_workers=2"), tokenizer, 3, state=state),
                       reference[3:6])


def test_resume_from_a_worker_step_state(demo_dir, tokenizer, reference):
    """``batch.data_state`` of a step built by a worker process restores the same sequence."""
    steps = _run_workers(_cfg(demo_dir, "data.num_workers=2"), tokenizer, 4)
    _assert_same_steps(_run(_cfg(demo_dir), tokenizer, dp=1, n_steps=2, state=steps[3]["data_state"]),
                       reference[4:6])


# ---------------------------------------------------------------------------------------------------------------
# 6. bad data


def _png(seed: int, size: int = 16) -> bytes:
    arr = np.random.default_rng(seed).integers(1, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _good(i: int) -> tuple[str, dict, list]:
    return f"g{i}", {"text": f"{PH}A small noisy picture, number {i}.", "category": "caption"}, [_png(i)]


def _write(out: Path, prefix: str, samples: list) -> Path:
    with ShardWriter(out, prefix, validate=False) as w:
        for key, rec, images in samples:
            w.write(key, rec, images)
    [shard] = w.shards
    return shard


def _cut(shard: Path, key: str, member: str) -> None:
    """Cut the shard in the middle of ``key``'s member (the index file becomes stale)."""
    entry = next(s for s in json.loads(index_path(shard).read_text())["samples"] if s["key"] == key)
    offset, size = entry["members"][member]
    shard.write_bytes(shard.read_bytes()[:offset + size // 2])


BAD_PLAN = {"custom/a-000000/notext", "custom/b-000000/long", "custom/d-000000/cutjson"}  # skipped at planning
BAD_IMAGE = {"custom/a-000000/badimg", "custom/c-000000/cutimg"}  # planned; blank image
CUSTOM_KEYS = ["custom/a-000000/g0", "custom/a-000000/g1", "custom/a-000000/badimg", "custom/a-000000/notext",
               "custom/b-000000/long", "custom/b-000000/g2", "custom/b-000000/g3",
               "custom/c-000000/g4", "custom/c-000000/g5", "custom/c-000000/cutimg",
               "custom/d-000000/g6", "custom/d-000000/cutjson"]  # "gone" lies after the cut of d


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> Path:
    """custom/{a,b,c,d}-000000.tar: good samples and one of each kind of damage."""
    root = tmp_path_factory.mktemp("bad_data")
    out = root / "custom"
    corrupt = _png(100)[:16] + b"\x00 this is not image data \xff" * 8  # a PNG signature, then junk
    _write(out, "a", [_good(0), _good(1),
                      ("badimg", {"text": f"{PH}A picture that cannot be decoded.", "category": "caption"},
                       [corrupt]),
                      ("notext", {"category": "caption", "caption": "the text is under the wrong key"}, [])])
    _write(out, "b", [("long", {"text": PH + " and".join(f" word{i}" for i in range(200)), "category": "caption"},
                       [_png(101)]), _good(2), _good(3)])
    c = _write(out, "c", [_good(4), _good(5),
                          ("cutimg", {"text": f"{PH}Its image is cut.", "category": "caption"}, [_png(102, 48)])])
    _cut(c, "cutimg", "0.png")
    d = _write(out, "d", [_good(6),
                          ("cutjson", {"text": f"{PH}Its JSON is cut. " + "x" * 300, "category": "caption"},
                           [_png(103)]),
                          ("gone", {"text": f"{PH}After the cut.", "category": "caption"}, [_png(104)])])
    _cut(d, "cutjson", "json")
    return root


def _bad_cfg(demo_dir: Path, bad_root: Path, *overrides: str):
    sources = ("data.sources=[{name: custom, path: '" + str(bad_root / "custom" / "*.tar") + "', type: shards, "
               "modality: multimodal, weight: 1.0}, {name: captions, path: 'shards/captions-*.tar', type: shards, "
               "modality: multimodal, weight: 1.0}]")
    return _cfg(demo_dir, sources, *overrides)


def test_bad_data_is_replaced_deterministically_and_counted(demo_dir, tokenizer, bad_shards, caplog):
    cfg = _bad_cfg(demo_dir, bad_shards)
    pipe = DataPipeline(cfg, tokenizer)
    custom = pipe.sources[0]
    assert custom.name == "custom"
    # the truncated shards: the damaged tail is absent, the cut samples stay (and are caught when read)
    assert [custom.key(i) for i in range(len(custom))] == CUSTOM_KEYS
    problems = custom.reader.problems
    assert sorted(Path(p).name for p in problems) == ["c-000000.tar", "d-000000.tar"], problems
    n_steps, used, blanks, batches = 6, [], 0, []
    for _ in range(n_steps):
        plan = pipe.plans.plan()
        batch = pipe.build(plan)
        batches.append(batch)
        assert plan.modality == "multimodal" and batch.bad_reads == 0
        assert batch.source_counts == {"custom": GBS // 2, "captions": GBS // 2}  # a skip never changes the mix
        assert set(batch.bad_samples) <= {"custom"}
        for s, p in enumerate(plan.slots):
            if p.source != 0:
                continue
            key = custom.key(p.index)
            used.append(key)
            assert key not in BAD_PLAN
            mb, row = batch.microbatches[s // MBS], s % MBS
            sample = pipe.encoder.encode(custom.record(p.index))
            n = len(sample.tokens)
            assert n == p.tokens
            assert mb.tokens[row, :n].tolist() == sample.tokens  # the text still trains
            assert bool((mb.tokens[row, n:] == tokenizer.pad_id).all())
            assert mb.labels[row, :n].tolist() == sample.labels
            assert int((mb.tokens[row] == tokenizer.image_id).sum()) == IMAGE_TOKENS
            assert int((mb.labels[row] != IGNORE).sum()) > 0
            if key in BAD_IMAGE:
                blanks += 1
                assert not bool(mb.images[row, 0].any()), key  # a blank (all-zero) image
            else:
                assert bool(mb.images[row, 0].any()), key
        assert batch.bad_images == sum(1 for p in plan.slots if p.source == 0 and custom.key(p.index) in BAD_IMAGE)
    # every draw of the custom source is either used or skipped; the replacement is the source's next draw
    n, seed = len(custom), cfg.train.seed
    drawn_count = pipe.plans.planner.counters[0]
    drawn = [CUSTOM_KEYS[FeistelPermutation(n, seed, 0, c // n)(c % n)] for c in range(drawn_count)]
    assert used == [k for k in drawn if k not in BAD_PLAN]
    skipped = sum(1 for k in drawn if k in BAD_PLAN)
    assert drawn_count >= 2 * n and skipped >= 6  # two whole epochs: every bad sample met at least twice
    assert sum(b.bad_samples.get("custom", 0) for b in batches) == skipped
    assert pipe.skipped() == {"custom": skipped, "captions": 0}
    assert sum(b.bad_images for b in batches) == blanks == sum(1 for k in used if k in BAD_IMAGE) >= 4
    assert set(used) == set(CUSTOM_KEYS) - BAD_PLAN
    assert batches[-1].data_state["bad_total"] == {"custom": skipped, "captions": 0}
    # the same replacement at dp=2: same samples, same counts, the blank images counted where decoded
    steps2 = _run(cfg, tokenizer, dp=2, n_steps=n_steps)
    for b, s in zip(batches, steps2):
        assert (s["samples_digest"], s["source_counts"], s["bad_samples"], s["bad_images"]) == \
            (b.samples_digest, b.source_counts, b.bad_samples, b.bad_images)
        assert all(_same_micro(x, y) for x, y in zip(s["micro"], b.microbatches))


def test_missing_shard_path_fails_at_construction(demo_dir, tokenizer, bad_shards):
    missing = bad_shards / "custom" / "missing-000000.tar"
    cfg = _cfg(demo_dir, f"data.sources=[{{name: ghost, path: '{missing}', type: shards, modality: multimodal}}]")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        DataPipeline(cfg, tokenizer)
    pattern = bad_shards / "custom" / "nothing-*.tar"
    cfg = _cfg(demo_dir, f"data.sources=[{{name: ghost, path: '{pattern}', type: shards, modality: multimodal}}]")
    with pytest.raises(FileNotFoundError, match="ghost.*nothing-"):
        DataPipeline(cfg, tokenizer)


@pytest.mark.parametrize("kind", ["no text", "too long", "corrupt json"])
def test_entirely_unreadable_source_fails_at_construction(demo_dir, tokenizer, tmp_path, kind):
    out = tmp_path / "junk"
    if kind == "no text":
        samples = [(f"k{i}", {"category": "caption"}, []) for i in range(25)]
    elif kind == "too long":
        samples = [(f"k{i}", {"text": "many words" * 300, "category": "caption"}, []) for i in range(25)]
    else:
        samples = [(f"k{i}", {"text": "fine", "category": "caption"}, []) for i in range(25)]
    shard = _write(out, "junk", samples)
    if kind == "corrupt json":  # same size: the index stays valid
        data = bytearray(shard.read_bytes())
        for s in json.loads(index_path(shard).read_text())["samples"]:
            data[s["members"]["json"][0]] = ord("#")
        shard.write_bytes(bytes(data))
    cfg = _cfg(demo_dir, f"data.sources=[{{name: junk, path: '{out}', type: shards, modality: multimodal}}]")
    with pytest.raises(ConfigError, match="junk.*unreadable"):
        DataPipeline(cfg, tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# 7. metrics


def _check_metrics(steps: list[dict], cfg, tok) -> None:
    names = {s.name for s in cfg.data.sources}
    sched = ModalitySchedule(cfg.data.language_ratio)
    lang, text_samples = 0, 0
    text = {s.name for s in cfg.data.sources if s.modality == "text"}
    for s in steps:
        lang += s["modality"] == "text"
        text_samples += sum(c for n, c in s["source_counts"].items() if n in text)
        assert s["language_ratio_target"] == sched.ratio(s["step"])
        if cfg.data.group_by_modality:
            assert s["language_ratio_realized"] == lang / s["step"]
        else:  # mixed steps: the share of language samples
            assert s["language_ratio_realized"] == text_samples / (s["step"] * GBS)
        assert set(s["source_counts"]) <= names and sum(s["source_counts"].values()) == GBS
        assert all(isinstance(v, int) and v > 0 for v in s["bad_samples"].values())
        assert set(s["bad_samples"]) <= names
        assert re.fullmatch(r"[0-9a-f]{16}", s["samples_digest"])
        micro = s["micro"]
        assert s["num_label_tokens"] == sum(int((mb.labels != IGNORE).sum()) for mb in micro) > 0
        assert s["num_tokens"] == sum(int((mb.tokens != tok.pad_id).sum()) for mb in micro)
        assert s["num_images"] == sum(sum(_image_counts(mb, tok.image_id)) for mb in micro)
        assert isinstance(s["bad_images"], int)
        assert set(s["data_state"]) >= {"planner", "language_steps", "bad_total"}
        assert s["data_state"]["language_steps"] == lang and s["data_state"]["planner"]["step"] == s["step"]
    assert len({s["samples_digest"] for s in steps}) == len(steps)


def test_step_metrics(demo_dir, tokenizer, reference):
    _check_metrics(reference, _cfg(demo_dir), tokenizer)
    # a warm-down 1.0 -> 0.7 over 4 steps, at dp=2: r = 1, .925, .85, .775, .7, .7
    cfg = _cfg(demo_dir, "data.language_ratio={start: 1.0, end: 0.7, warmup_steps: 4, shape: linear}")
    steps = _run(cfg, tokenizer, dp=2, n_steps=6)
    assert [s["language_ratio_target"] for s in steps] == pytest.approx([1.0, 0.925, 0.85, 0.775, 0.7, 0.7])
    assert [s["modality"] for s in steps] == ["text"] * 4 + ["multimodal", "text"]
    assert [s["language_ratio_realized"] for s in steps] == [1.0, 1.0, 1.0, 1.0, 0.8, 5 / 6]
    _check_metrics(steps, cfg, tokenizer)
    # mixed steps: the schedule sets the share of language samples
    cfg = _cfg(demo_dir, "data.group_by_modality=false")
    steps = _run(cfg, tokenizer, dp=1, n_steps=3)
    assert [s["language_ratio_target"] for s in steps] == [0.5] * 3
    _check_metrics(steps, cfg, tokenizer)
    # with one modality configured no schedule applies: no target
    cfg = _cfg(demo_dir, "data.group_by_modality=false", "data.sources=[{name: c, path: shards/captions-*.tar}]")
    assert [s["language_ratio_target"] for s in _run(cfg, tokenizer, dp=1, n_steps=2)] == [None] * 2
