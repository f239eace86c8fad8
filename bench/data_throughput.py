"""Samples/s of the stage-2 multimodal image stream at real resolution: our pipeline vs plain webdataset + PIL.

    python bench/data_throughput.py [--samples 128] [--workers 1 2] [--repeats 3] [--size 1024] [--low 384]

Makes a synthetic shard set first (photo-like 640x480 JPEGs, written with ShardWriter into a temp dir), so it needs
nothing else. Each pipeline delivers what its model takes for the hybrid 1024 + 384 towers: decode the JPEG, resize
the longer side to ``--size`` with antialiased bicubic, pad to square with the CLIP-mean colour; a DataLoader with
``batch_size=8`` stacks the images. Both models derive the 384 SigLIP view from that image on the device
(models/vision.py; DeepSeek-VL's HybridVisionTower), so neither loader does by default; ``--low 384`` makes both
derive it in the loader as well (float, antialiased bilinear, the model's own resize).

- ours: our data path's functions: ``ShardReader`` random access (shuffled order) + ``decode_image`` (header by
  PIL, JPEG pixels by torchvision's libjpeg-turbo) + ``resize_and_pad`` (uint8 torch resize), delivered as uint8
  (the engine scales to [0, 1] on the device) in a map-style ``Dataset``;
- webdataset+PIL: ``webdataset.WebDataset`` over the same shards (sequential, split by worker) + PIL decode,
  ``Image.resize(BICUBIC)``, ``expand2square`` with ``Image.new``/``paste``, to a [0, 1] float tensor: what the
  official ``VLMImageProcessor`` does (before its normalisation).

Per worker count, both loaders (persistent workers) live side by side and ``bench/_ab.py`` runs their epochs
interleaved (ours, webdataset+PIL, ours, ...): ``--warmup`` untimed epochs each, then ``--repeats`` timed ones;
every epoch of either is all the samples (checked). Reported: samples/s per pipeline, median and min-max over
the epochs, and the ratio ours / webdataset+PIL (the goal: >= 2.0). Everything runs in this one process, on the
same shards; the last line is one JSON object (headline: the last worker count).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ab  # noqa: E402

from vlpretrain.data.preprocess import CLIP_MEAN, background_color, decode_image, resize_and_pad  # noqa: E402
from vlpretrain.data.shards import ShardReader, ShardWriter, expand_shards  # noqa: E402

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
        """What our data path hands the model per image (data/loader.py): the uint8 1024 canvas (the engine
        scales it to [0, 1] on the device; 4x fewer bytes through the worker queue)."""
        rec = self.reader.read(i)
        img = decode_image(rec["images"][0], rec["__shard__"], rec["__key__"])
        x = resize_and_pad(img, self.size, CLIP_MEAN)
        return x, (_low(x.float().div_(255.0), self.low) if self.low > 0 else x.new_empty(0))


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


def epoch_fn(name: str, loader, expected: int):
    """One epoch over the loader: samples/s, after checking the sample count and the tensor shapes."""
    def epoch() -> dict:
        t0 = time.perf_counter()
        n, hi, lo = 0, None, None
        for hi, lo in loader:  # noqa: B007 (the last batch's shapes are checked below)
            n += hi.shape[0]
        dt = time.perf_counter() - t0
        if n != expected:
            raise RuntimeError(f"{name}: epoch gave {n} samples, expected {expected}")
        if hi.shape[1:] != (3, args.size, args.size) or (args.low > 0 and lo.shape[1:] != (3, args.low, args.low)):
            raise RuntimeError(f"{name}: unexpected shapes {tuple(hi.shape)} {tuple(lo.shape)}")
        return {"samples_per_s": n / dt, "epoch_s": dt}
    return epoch


def make_loader(dataset, workers: int, shuffle: bool):
    kwargs = dict(batch_size=BATCH, num_workers=workers, collate_fn=_collate, persistent_workers=workers > 0,
                  prefetch_factor=2 if workers > 0 else None)
    if shuffle:
        kwargs.update(shuffle=True, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(dataset, **kwargs)


def run_setting(shards: list[Path], workers: int, repeats: int, warmup: int, expected: int) -> tuple[dict, float]:
    """Ours and webdataset+PIL with ``workers`` persistent workers each, epochs interleaved (ours, wds, ours,
    wds ...) after ``warmup`` untimed epochs each (worker start, page cache, allocator). Also returns the CPU
    cores used over the whole setting (both loaders' workers, counted once they are joined)."""
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    loaders = {"ours": make_loader(OursDataset(shards, args.size, args.low), workers, True),
               "wds_pil": make_loader(wds_dataset(shards, args.size, args.low), workers, False)}
    res = _ab.interleave({name: epoch_fn(name, ld, expected) for name, ld in loaders.items()}, repeats, warmup)
    del loaders  # shuts the workers down (joined: their CPU time lands in RUSAGE_CHILDREN)
    gc.collect()
    return res, (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)


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
    _ab.add_args(p, repeats=3, warmup=1)  # timed / untimed epochs per pipeline, interleaved
    p.add_argument("--size", type=int, default=1024, help="SAM input side")
    p.add_argument("--low", type=int, default=0, help="also derive the SigLIP input of this side in the loader "
                                                           "(both models derive it on the device: 0, the default)")
    args = p.parse_args(argv)

    import webdataset

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vl-bench-") as tmp:
        shards = make_shards(Path(tmp), args.samples, args.per_shard)
        mb = sum(s.stat().st_size for s in shards) / 1e6
        print(f"data: {args.samples} samples (640x480 JPEG) in {len(shards)} shards, {mb:.1f} MB, made in "
              f"{time.perf_counter() - t_start:.1f} s; {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"webdataset {webdataset.__version__}, Pillow {Image.__version__}")
        low = f" -> bilinear antialiased {args.low} in the loader" if args.low > 0 else ""
        print(f"work per sample: decode -> bicubic longer side {args.size} -> pad (mean colour) (ours: uint8, "
              f"webdataset+PIL: [0,1] float){low}; batch {BATCH}; epochs of ours and webdataset+PIL interleaved, "
              f"{args.warmup} warm-up + "
              f"{args.repeats} timed each; median (min-max)")
        a, b = per_sample_ms(shards, args.size, args.low)
        print(f"  in-process, 1 thread, per sample (no collation): ours {a:.1f} ms | webdataset+PIL map {b:.1f} ms "
              f"| ratio {b / a:.2f}x", flush=True)
        records = []
        for k in args.workers:
            if len(shards) < k:
                print(f"  (webdataset with {k} workers needs >= {k} shards; have {len(shards)})")
            res, cores = run_setting(shards, k, args.repeats, args.warmup, args.samples)
            print(f"\n{k} worker{'s' if k > 1 else ''} each (every epoch of both: the same {args.samples} samples; "
                  f"CPU cores used {cores:.2f}):")
            print(_ab.table(res, ["samples_per_s", "epoch_s"]))
            rec = _ab.record("data_throughput", {"workers": k}, res, "ours", "wds_pil", "samples_per_s", goal=2.0,
                             size=args.size, low=args.low, samples=args.samples, cores=round(cores, 2))
            print(_ab.ratio_line(rec), flush=True)
            records.append(rec)

    if len(args.workers) > 1:
        k0, k1 = records[0], records[-1]
        for name in ("ours", "wds_pil"):
            s = k1[f"{name}_median"] / k0[f"{name}_median"]
            print(f"{name}: {k1['workers']} vs {k0['workers']} workers: {s:.2f}x")
    print(f"total {time.perf_counter() - t_start:.1f} s (CPU cores used well below 2 x workers + 1 means other load "
          f"on the machine: the worker-scaling numbers are then not meaningful)")
    _ab.emit(records)
    return 0


args: argparse.Namespace

if __name__ == "__main__":
    raise SystemExit(main())
