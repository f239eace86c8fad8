"""What the checkpoint checksums (manifest.json, CRC-32 per file) cost: save and load time with and without.

    python bench/ckpt_checksum.py [--repeats 3] [--size 1.3b] [--dir /tmp]

Two single-process states, saved with ``Checkpointer.save`` (DCP shards + train_state.json + manifest, verified,
published) and loaded with ``verify`` + ``Checkpointer.load`` (what ``--resume auto`` does):

- tiny: the tiny hybrid VLM (configs/tiny) with AdamW states for every parameter (~9 MB per checkpoint);
- 1.3b: the weights of a DeepSeek-VL-1.3B-size LLM (vocab 102400, dim 2048, 24 layers, ffn 5504: 1.63 B
  parameters with its untied output head) in bf16, weights only (3.3 GB per checkpoint; fp32 weights + Adam would be
  20 GB, more than fits
  here beside the page cache); ``--size none`` skips it.

"without" sets ``integrity.CHECKSUMS = False``: the manifest then holds sizes only, which is what verification
cost before checksums. With and without alternate (interleaved repeats); the medians give the ratios. The last
line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlpretrain.checkpoint import integrity  # noqa: E402
from vlpretrain.checkpoint.dcp import Checkpointer, verify  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def tiny_state() -> tuple[list, list]:
    from vlpretrain.config import load_config
    from vlpretrain.models.vlm import build_model

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage2.yaml")
    model = build_model(cfg.model, "cpu")
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return [model], [opt]


def llm_1_3b_state() -> tuple[list, list]:
    vocab, dim, layers, ffn = 102400, 2048, 24, 5504
    shapes = {"tok_embeddings.weight": (vocab, dim), "output.weight": (vocab, dim), "norm.weight": (dim,)}
    for i in range(layers):
        for name in ("wq", "wk", "wv", "wo"):
            shapes[f"layers.{i}.attention.{name}.weight"] = (dim, dim)
        shapes[f"layers.{i}.feed_forward.w1.weight"] = (ffn, dim)
        shapes[f"layers.{i}.feed_forward.w3.weight"] = (ffn, dim)
        shapes[f"layers.{i}.feed_forward.w2.weight"] = (dim, ffn)
        shapes[f"layers.{i}.attention_norm.weight"] = (dim,)
        shapes[f"layers.{i}.ffn_norm.weight"] = (dim,)
    model = nn.Module()
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():  # flat names: a plain module per dotted prefix is not needed for DCP
        model.register_parameter(name.replace(".", "__"),
                                 nn.Parameter(torch.randn(shape, generator=g, dtype=torch.bfloat16),
                                              requires_grad=False))
    print(f"1.3b state: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, bf16", flush=True)
    return [model], [None]


def bench(name: str, modules: list, optimizers: list, root: Path, repeats: int) -> dict:
    times = {("save", True): [], ("save", False): [], ("load", True): [], ("load", False): []}
    ck = root / name
    train_state = {"consumed_samples": 0, "data_state": {}}
    for r in range(repeats + 1):  # the first round warms up (allocations, imports) and is not counted
        for checksums in ((True, False) if r % 2 == 0 else (False, True)):
            integrity.CHECKSUMS = checksums
            shutil.rmtree(ck, ignore_errors=True)
            ckpt = Checkpointer(ck, modules, optimizers, keep_last=1, is_main=True)
            t0 = time.perf_counter()
            path = ckpt.save(1, train_state)
            t1 = time.perf_counter()
            assert verify(path) is None
            ckpt.load(path)
            t2 = time.perf_counter()
            if r:
                times[("save", checksums)].append(t1 - t0)
                times[("load", checksums)].append(t2 - t1)
    integrity.CHECKSUMS = True
    size = sum(f.stat().st_size for f in (ck / "step_00000001").iterdir())
    shutil.rmtree(ck, ignore_errors=True)
    med = {f"{op}_s_{'with' if c else 'without'}": round(statistics.median(v), 4) for (op, c), v in times.items()}
    out = {"bytes": size, **med, "samples": {f"{op}_{'with' if c else 'without'}": [round(x, 3) for x in v]
                                             for (op, c), v in times.items()},
           "save_ratio": round(med["save_s_with"] / med["save_s_without"], 3),
           "load_ratio": round(med["load_s_with"] / med["load_s_without"], 3)}
    print(f"{name}: {size / 1e6:.1f} MB; save {med['save_s_without']:.3f} s -> {med['save_s_with']:.3f} s with "
          f"checksums (x{out['save_ratio']}); verify+load {med['load_s_without']:.3f} s -> {med['load_s_with']:.3f} s "
          f"(x{out['load_ratio']})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", choices=["1.3b", "none"], default="1.3b")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir))
    try:
        buf = torch.randint(0, 255, (512 << 20,), dtype=torch.uint8).numpy().tobytes()
        f = root / "probe"
        f.write_bytes(buf)
        t0 = time.perf_counter()
        integrity.crc32_file(f)
        crc_gbps = len(buf) / (time.perf_counter() - t0) / 1e9
        f.unlink()
        del buf
        print(f"crc32 over a cached 512 MB file: {crc_gbps:.2f} GB/s", flush=True)
        result = {"crc32_GBps": round(crc_gbps, 2), "repeats": args.repeats,
                  "tiny": bench("tiny", *tiny_state(), root, args.repeats)}
        if args.size == "1.3b":
            result["1.3b_bf16_weights"] = bench("1.3b", *llm_1_3b_state(), root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
