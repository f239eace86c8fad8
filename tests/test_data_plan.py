"""The data path plans from sample sizes and each rank builds only its share (issues 10 and 11):

* each TP rank decodes only the images it encodes (``image_split``): the union over TP ranks is the full set;
* first fit has one implementation (``packing.FirstFit``), equal to a plain scan;
* sizes are stored in the shard index / side indexes, keyed by the tokenizer, and rebuilt when it changes;
* planning reads no text: a rank reads only its own rows' samples; DataLoader workers receive only their steps;
* a sample that no longer reads as it was sized is masked in place, deterministically.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from vlpretrain.config import load_config
from vlpretrain.data.loader import DataPipeline, image_share
from vlpretrain.data.packing import FirstFit
from vlpretrain.data.shards import index_path
from vlpretrain.data.sources import JsonlSource, ShardSource
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
