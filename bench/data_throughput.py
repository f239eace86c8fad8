"""Samples/s of the stage-2 multimodal image stream at real resolution: our pipeline vs plain webdataset + PIL.

    python bench/data_throughput.py [--samples 128] [--workers 1 2] [--repeats 3] [--size 1024] [--low 384]

Makes a synthetic shard set first (photo-like 640x480 JPEGs, written with ShardWriter into a temp dir), so it needs
nothing else. Both pipelines do the same work per sample: decode the JPEG, resize the longer side to ``--size``
with antialiased bicubic, pad to square with the CLIP-mean colour, scale to [0, 1] float, and derive the SigLIP
input as the model does (antialiased bilinear resize of that tensor to ``--low``); a DataLoader with
``batch_size=8`` stacks both tensors.

- ours: ``ShardReader`` random access (shuffled order) + ``decode_image`` + ``preprocess_image`` (uint8 torch
  resize) in a map-style ``Dataset``;
- webdataset+PIL: ``webdataset.WebDataset`` over the same shards (sequential, split by worker) + PIL decode,
  ``Image.resize(BICUBIC)``, ``expand2square`` with ``Image.new``/``paste``, to tensor: what the official
  ``VLMImageProcessor`` does.

Each configuration uses persistent workers: one warm-up epoch over all samples, then ``--repeats`` timed epochs;
the median epoch gives samples/s. Every configuration runs in this one process, on the same shards.
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlpretrain.data.preprocess import CLIP_MEAN, background_color, preprocess_image  # noqa: E402
from vlpretrain.data.shards import ShardReader, ShardWriter, decode_image, expand_shards  # noqa: E402

BATCH = 8


# ----------------------------------------------------------------------------- data


def _photo_jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    """A photo-like JPEG: smooth random colour field + gradients + noise (JPEG size like a real photo's)."""
    base = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    yy, xx = np.mgrid[0:h, 0:w]
    grad = ((xx * rng.uniform(-0.1, 0.1) + yy * rng.uniform(-0.1, 0.1))[..., None]).astype(np.int16)
    arr = np.clip(smooth + grad + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(out: Path, n: int, per_shard: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    with ShardWriter(out, "bench", max_samples_per_shard=per_shard) as writer:
        for i in range(n):
            record = {"text": "<image_placeholder> A synthetic photo.", "category": "caption"}
            writer.write(f"{i:08d}", record, [_photo_jpeg(rng, 480, 640)])
    return expand_shards(out)


# ----------------------------------------------------------------------------- pipelines


def _low(x: torch.Tensor, low: int) -> torch.Tensor:
    """The SigLIP input as the model derives it (models/vision.py): antialiased bilinear resize (``--low 0``: none,
    an empty tensor instead)."""
    if low <= 0:
        return x.new_empty(0)
    return F.interpolate(x.unsqueeze(0), size=(low, low), mode="bilinear", align_corners=False,
                         antialias=True).squeeze(0)


class OursDataset(torch.utils.data.Dataset):
    def __init__(self, shards: list[Path], size: int, low: int):
        self.reader = ShardReader(shards)
        self.size, self.low = size, low

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        rec = self.reader.read(i)
        img = decode_image(rec["images"][0], rec["__shard__"], rec["__key__"])
        x = preprocess_image(img, self.size, CLIP_MEAN)
        return x, _low(x, self.low)


def _expand2square(pil_img: Image.Image, color) -> Image.Image:  # the official helper
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), color)
    result.paste(pil_img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


class PILMap:
    """webdataset sample dict -> (1024 tensor, 384 tensor), the official way on PIL images (picklable)."""

    def __init__(self, size: int, low: int):
        self.size, self.low = size, low
        self.fill = background_color(CLIP_MEAN)

    def __call__(self, sample: dict):
        raw = next(v for k, v in sample.items() if k.split(".")[-1] in ("jpg", "jpeg", "png"))
        with Image.open(io.BytesIO(raw)) as im:
            pil = im.convert("RGB")
        w, h = pil.size
        m = max(w, h)
        nh, nw = max(int(h / m * self.size), 14), max(int(w / m * self.size), 14)
        pil = _expand2square(pil.resize((nw, nh), Image.Resampling.BICUBIC), self.fill)
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float().div_(255.0)
        return x, _low(x, self.low)


def wds_dataset(shards: list[Path], size: int, low: int):
    import webdataset as wds

    urls = [str(p) for p in shards]
    return wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(PILMap(size, low))


def _collate(items):
    """Stack the 1024 and the 384 tensors (default_collate: in a worker it stacks straight into shared memory)."""
    return torch.utils.data.default_collate(items)


# ----------------------------------------------------------------------------- timing


def run(name: str, dataset, workers: int, repeats: int, expected: int, shuffle: bool) -> dict:
    kwargs = dict(batch_size=BATCH, num_workers=workers, collate_fn=_collate, persistent_workers=workers > 0,
                  prefetch_factor=2 if workers > 0 else None)
    if shuffle:
        kwargs.update(shuffle=True, generator=torch.Generator().manual_seed(0))
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    loader = torch.utils.data.DataLoader(dataset, **kwargs)
    times, counts = [], []
    for epoch in range(repeats + 1):  # epoch 0: warm-up (worker start, page cache, allocator)
        t0 = time.perf_counter()
        n = 0
        for hi, lo in loader:
            n += hi.shape[0]
        dt = time.perf_counter() - t0
        if n != expected:
            raise RuntimeError(f"{name}: epoch gave {n} samples, expected {expected}")
        if hi.shape[1:] != (3, args.size, args.size) or (args.low > 0 and lo.shape[1:] != (3, args.low, args.low)):
            raise RuntimeError(f"{name}: unexpected shapes {tuple(hi.shape)} {tuple(lo.shape)}")
        if epoch:
            times.append(dt)
            counts.append(n)
    del hi, lo, loader  # shuts the workers down (joined: their CPU time lands in RUSAGE_CHILDREN)
    gc.collect()
    cores = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    rates = [c / t for c, t in zip(counts, times)]
    return {"name": name, "workers": workers, "rate": statistics.median(rates), "rates": rates, "cores": cores}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished (joined) children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def per_sample_ms(shards: list[Path], size: int, low: int, n: int = 32, repeats: int = 3) -> tuple[float, float]:
    """In-process, one torch thread, no DataLoader: median ms per sample of each pipeline's per-sample work
    (everything but collation), insensitive to other load on the machine's other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = OursDataset(shards, size, low)
        pil = PILMap(size, low)
        idx = list(range(min(n, len(ours))))
        samples = []
        for i in idx:  # the raw webdataset-style dicts (bytes already read), as WebDataset hands them to .map
            rec = ours.reader.read(i)
            samples.append({"__key__": rec["__key__"], "0.jpg": rec["images"][0]})

        def timed(fn) -> float:
            fn(0)
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in idx:
                    fn(i)
                runs.append((time.perf_counter() - t0) / len(idx) * 1000)
            return statistics.median(runs)

        return timed(lambda i: ours[i]), timed(lambda i: pil(samples[i]))
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    global args
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=128, help="samples in the synthetic shard set (= one epoch)")
    p.add_argument("--per-shard", type=int, default=16, help="samples per shard (webdataset splits shards "
                                                             "across workers)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration (median)")
    p.add_argument("--size", type=int, default=1024, help="SAM input side")
    p.add_argument("--low", type=int, default=384, help="SigLIP input side (derived from the --size tensor; 0: leave "
                                                             "that resize out)")
    args = p.parse_args(argv)

    import webdataset

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vl-bench-") as tmp:
        shards = make_shards(Path(tmp), args.samples, args.per_shard)
        mb = sum(s.stat().st_size for s in shards) / 1e6
        print(f"data: {args.samples} samples (640x480 JPEG) in {len(shards)} shards, {mb:.1f} MB, made in "
              f"{time.perf_counter() - t_start:.1f} s; {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"webdataset {webdataset.__version__}, Pillow {Image.__version__}")
        low = f" -> bilinear antialiased {args.low}" if args.low > 0 else ""
        print(f"work per sample: decode -> bicubic longer side {args.size} -> pad (mean colour) -> [0,1] float"
              f"{low}; batch {BATCH}; {args.repeats} timed epochs after 1 warm-up, "
              f"median")
        a, b = per_sample_ms(shards, args.size, args.low)
        print(f"  in-process, 1 thread, per sample (no collation): ours {a:.1f} ms | webdataset+PIL map {b:.1f} ms "
              f"| ratio {b / a:.2f}x", flush=True)
        results = {}
        for k in args.workers:
            for name, ds, shuffle in (("ours", OursDataset(shards, args.size, args.low), True),
                                      ("webdataset+PIL", wds_dataset(shards, args.size, args.low), False)):
                if name != "ours" and len(shards) < k:
                    print(f"  (webdataset with {k} workers needs >= {k} shards; have {len(shards)})")
                r = run(name, ds, k, args.repeats, args.samples, shuffle)
                results[(name, k)] = r
                print(f"  {name:>15s} {k} worker{'s' if k > 1 else ' '}: {r['rate']:7.1f} samples/s  "
                      f"(epochs: {', '.join(f'{x:.1f}' for x in r['rates'])}; CPU cores used {r['cores']:.2f})",
                      flush=True)

    print()
    print("| workers | ours (samples/s) | webdataset+PIL (samples/s) | ratio |")
    print("|---|---|---|---|")
    for k in args.workers:
        a, b = results[("ours", k)]["rate"], results[("webdataset+PIL", k)]["rate"]
        print(f"| {k} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    for k in args.workers:
        a, b = results[("ours", k)]["rate"], results[("webdataset+PIL", k)]["rate"]
        print(f"ours {k} worker{'s' if k > 1 else ''}: {a:.1f} samples/s | webdataset+PIL {k} "
              f"worker{'s' if k > 1 else ''}: {b:.1f} samples/s | ratio {a / b:.2f}x")
    if len(args.workers) > 1:
        k0, k1 = args.workers[0], args.workers[-1]
        for name in ("ours", "webdataset+PIL"):
            s = results[(name, k1)]["rate"] / results[(name, k0)]["rate"]
            print(f"{name}: {k1} vs {k0} workers: {s:.2f}x")
    print(f"total {time.perf_counter() - t_start:.1f} s (CPU cores used well below workers + 1 means other load "
          f"on the machine: the worker-scaling numbers are then not meaningful)")
    return 0


args: argparse.Namespace

if __name__ == "__main__":
    raise SystemExit(main())
