"""Balanced steps (``data.balance: rows``) vs contiguous shares (``none``): training steps/s at dp = 2.

The heavy-vision tiny model of ``bench/vision_split.py`` (SigLIP + SAM towers that dominate the step; stage 2:
towers frozen, adaptor + LLM learn; vocabulary of the demo tokenizer) under torchrun at dp = 2 (FSDP, gloo,
one thread per rank). The data: a multimodal JSONL source of the demo's images whose samples carry 0-4 images
(uniformly at random) and are longer than half a row, so every packed row holds one sample and 0-4 images.
Each rank builds the same ``--steps`` planned global steps twice with the real ``DataPipeline`` (its rows under
both placements; row costs from ``pipeline_cost.row_cost``), before any timing. Then, after a warm-up round,
the two placements run interleaved (A B A B, ``bench/_ab.py``): each repeat is ``forward_backward`` over all
the steps (gradients reduced over dp, the slowest rank sets the time), barriers around it; steps/s per repeat.
Both placements train the same rows and the same parameters (no optimizer step), so only the placement
differs. Also printed: the predicted imbalance of the steps under each placement (the predicted step over the
mean rank's cost; without a pipeline the ranks' microbatches run in lockstep, ``data/placement.py``).

    python bench/step_balance.py [--steps 12] [--repeats 5] [--warmup 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ab  # noqa: E402
from vision_split import MODEL  # noqa: E402

GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN, MAX_IMAGES = 8, 2, 320, 4
VARIANTS = ("rows", "none")


def config(data: Path) -> dict:
    model = {**MODEL, "vocab_size": 2048, "max_seq_len": SEQ_LEN}
    return {"model": model,
            "train": {"stage": 2, "steps": 1, "global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO_BATCH,
                      "seq_len": SEQ_LEN, "lr": 1e-4, "dtype": "fp32", "init_from": "", "eval_file": "",
                      "eval_text": ""},
            "parallel": {"dp": 2, "tp": 1, "pp": 1},
            "data": {"root": str(data), "packing": True, "num_workers": 0,
                     "language_ratio": {"start": 0.0, "end": 0.0, "warmup_steps": 0, "shape": "linear"},
                     "sources": [{"name": "mm", "path": "balance.jsonl", "modality": "multimodal"}]}}


def write_data(demo: Path, image_tokens: int, n: int = 400, seed: int = 0) -> None:
    """``demo/balance.jsonl``: samples of 0-4 images, each longer than half a row (one per packed row)."""
    from vlpretrain.data.tokenizer import TextTokenizer

    tok = TextTokenizer(demo / "tokenizer.json")
    rng = random.Random(seed)
    images = sorted(p.name for p in (demo / "images").glob("*.png"))
    words = "the chart shows a red square next to a blue circle and some bars of different heights".split()
    lines = []
    for i in range(n):
        k = rng.randint(0, MAX_IMAGES)
        target = max(8, rng.randint(SEQ_LEN // 2 + 8, SEQ_LEN - 16) - k * image_tokens)  # text tokens wanted
        text, got = "", 0
        while got < target:  # chunk by chunk (a chunk's tokens: about its share of the whole text's)
            chunk = " " + " ".join(rng.choice(words) for _ in range(4))
            text, got = text + chunk, got + len(tok.encode(chunk))
        parts = ["<image_placeholder>"] * k
        lines.append(json.dumps({"id": f"b{i:05d}", "images": [f"images/{rng.choice(images)}" for _ in range(k)],
                                 "text": " ".join(parts) + text}))
    (demo / "balance.jsonl").write_text("\n".join(lines) + "\n")


def worker(data: str, out: str, steps: int, repeats: int, warmup: int) -> None:
    import torch
    import torch.distributed as dist

    from vlpretrain.config import config_from_dict
    from vlpretrain.data.loader import DataPipeline
    from vlpretrain.data.tokenizer import TextTokenizer
    from vlpretrain.parallel.engine import ParallelModel
    from vlpretrain.parallel.mesh import init_parallel
    from vlpretrain.parallel.pipeline_cost import row_cost

    torch.set_num_threads(1)
    cfg = config_from_dict(config(Path(data)))
    model = ParallelModel(cfg, init_parallel(cfg, torch.device("cpu")))
    rank = dist.get_rank()
    tok = TextTokenizer(Path(data) / "tokenizer.json")
    batches, imbalance = {}, {}
    for balance in VARIANTS:
        c = copy.deepcopy(cfg)
        c.data.balance = balance
        pipe = DataPipeline(c, tok, dp_rank=rank, dp_size=2, row_cost=row_cost(c))
        batches[balance] = [next(pipe) for _ in range(steps)]
        imbalance[balance] = [b.rank_cost_imbalance for b in batches[balance]]
    assert [b.samples_digest for b in batches["rows"]] == [b.samples_digest for b in batches["none"]]

    def run(balance: str) -> dict:
        dist.barrier()
        t0 = time.perf_counter()
        for b in batches[balance]:
            model.forward_backward(b.microbatches, b.num_label_tokens)
            for p in model.trainable_parameters():
                p.grad = None
        dist.barrier()
        dt = time.perf_counter() - t0
        return {"steps_per_s": steps / dt, "step_s": dt / steps}

    res = _ab.interleave({b: (lambda b=b: run(b)) for b in VARIANTS}, repeats, warmup)
    if rank == 0:
        images = [[int((mb.tokens == cfg.model.image_token_id).sum()) // cfg.model.image_tokens
                   for mb in b.microbatches] for b in batches["none"][:3]]
        Path(out).write_text(json.dumps({"results": res, "imbalance": imbalance, "images_rank0": images,
                                         "num_images": sum(b.num_images for b in batches["none"])}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="global steps per repeat and variant")
    _ab.add_args(ap, repeats=5, warmup=1)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, args.steps, args.repeats, args.warmup)
        return
    import statistics

    from data_tools import generate_demo
    from vlpretrain.config import config_from_dict

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate_demo(data, seed=0, scale=0.05, verbose=False)
        write_data(data, config_from_dict(config(data)).model.image_tokens)
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--worker", str(data), str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            sys.exit(f"bench failed:\n{proc.stderr[-4000:]}")
        got = json.loads(out.read_text())
    res = got["results"]
    print(f"heavy-vision tiny model, stage 2, dp=2 (FSDP, gloo, 1 thread per rank), {GLOBAL_BATCH} packed rows x "
          f"{SEQ_LEN} tokens per step, micro-batch {MICRO_BATCH}, rows of 0-{MAX_IMAGES} images "
          f"({got['num_images']} images in {args.steps} steps); {args.steps} steps per repeat, {args.warmup} warm-up "
          f"round(s), {args.repeats} interleaved repeats")
    print(f"images per microbatch on rank 0, first steps, contiguous: {got['images_rank0']}")
    for b in VARIANTS:
        print(f"predicted imbalance (step / mean rank cost), {b}: mean {statistics.mean(got['imbalance'][b]):.3f}, "
              f"max {max(got['imbalance'][b]):.3f}")
    print(_ab.table(res, ["steps_per_s", "step_s"]))
    rec = _ab.record("step_balance", {"dp": 2}, res, "rows", "none", "steps_per_s", goal=1.10,
                     imbalance_rows=round(statistics.mean(got["imbalance"]["rows"]), 4),
                     imbalance_none=round(statistics.mean(got["imbalance"]["none"]), 4), steps=args.steps)
    print(_ab.ratio_line(rec), flush=True)
    _ab.emit([rec])


if __name__ == "__main__":
    main()
