"""Read throughput of the formats read in place (data/formats.py) against our native shards, on the same samples.

    flock /tmp/vlp/cpu.lock env OMP_NUM_THREADS=1 python bench/formats_read.py [--n 500] [--repeats 3]

Writes N image-caption samples (photo-like 320x240 JPEGs, ~20 KB) as: our shards (ShardWriter), an img2dataset
folder (key.jpg + key.txt + key.json per sample, .parquet/_stats.json beside), webdataset's ShardWriter output,
a LLaVA JSON + image folder (the caption as the answer) and a Hugging Face-style Parquet file (image
struct<bytes, path>, row groups of 100 rows as `datasets` writes image sets; read with its row-group cache,
and with the image cache off: what a data set much bigger than the cache costs in a shuffled order). Then reads
every sample in one shuffled order (what the planner's order does to a reader), through each source as the
loader does: the record (text side: what a rank reads for every sample it trains on) and the record plus the
decoded image (the ranks that feed the vision encoder). Prints samples/s, median of the repeats, one process,
one thread.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlpretrain.config import SourceConfig  # noqa: E402
from vlpretrain.data.manifest import open_source  # noqa: E402
from vlpretrain.data.shards import IMAGE_PLACEHOLDER, ShardWriter  # noqa: E402


def photo(i: int) -> bytes:
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:240, 0:320]
    base = np.stack([(x * (1 + i % 3) + y) % 256, (y * 2 + i) % 256, (x + y * (i % 5)) % 256], -1)
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_all(root: Path, n: int) -> dict[str, tuple[Path, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    images = [photo(i) for i in range(n)]
    caps = [f"a photo number {i} of a colourful gradient with some noise on it" for i in range(n)]
    with ShardWriter(root / "native", "cap", max_samples_per_shard=250) as w:
        for i in range(n):
            w.write(f"{i:08d}", {"text": IMAGE_PLACEHOLDER + caps[i], "category": "caption"}, [images[i]])
    (root / "img2dataset").mkdir()
    for s in range(0, n, 250):
        with tarfile.open(root / "img2dataset" / f"{s // 250:05d}.tar", "w") as tar:
            for i in range(s, min(n, s + 250)):
                key = f"{s // 250:05d}{i:04d}"
                meta = {"caption": caps[i], "url": f"http://x/{i}", "key": key, "status": "success"}
                for name, data in ((f"{key}.jpg", images[i]), (f"{key}.txt", caps[i].encode()),
                                   (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (root / "img2dataset" / f"{s // 250:05d}.parquet").write_bytes(b"PAR1")
    (root / "wds").mkdir()
    with wds.ShardWriter(str(root / "wds" / "w-%06d.tar"), maxcount=250, verbose=0) as sink:
        for i in range(n):
            sink.write({"__key__": f"s{i:06d}", "jpg": images[i], "txt": caps[i]})
    (root / "llava" / "img").mkdir(parents=True)
    items = []
    for i in range(n):
        (root / "llava" / "img" / f"{i:06d}.jpg").write_bytes(images[i])
        items.append({"id": str(i), "image": f"img/{i:06d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caps[i]}]})
    (root / "llava" / "data.json").write_text(json.dumps(items))
    (root / "parquet").mkdir()
    table = pa.Table.from_pylist([{"image": {"bytes": images[i], "path": f"{i}.jpg"}, "caption": caps[i]}
                                  for i in range(n)])
    pq.write_table(table, root / "parquet" / "train-00000-of-00001.parquet", row_group_size=100)
    return {"native shards": (root / "native", {}), "img2dataset tars": (root / "img2dataset", {}),
            "webdataset ShardWriter": (root / "wds", {}), "llava json": (root / "llava" / "data.json", {}),
            "parquet (100-row groups)": (root / "parquet", {}),
            "parquet, image cache off": (root / "parquet", {"cache": 0})}


def rate(src, order, images: bool) -> float:
    t0 = time.perf_counter()
    for i in order:
        rec = src.record(int(i))
        if images:
            for j in range(len(rec["images"])):
                src.image(int(i), j, rec)
    return len(order) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    order = np.random.default_rng(0).permutation(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        sets = write_all(Path(tmp), args.n)
        print(f"{args.n} samples, shuffled order, median of {args.repeats} (interleaved); samples/s")
        print(f"{'format':28s} {'record':>10s} {'record+image':>13s}")
        runs: dict = {(name, images): [] for name in sets for images in (False, True)}
        kinds = {}
        for _ in range(args.repeats):  # rounds over all formats: drift on a shared machine hits them alike
            for name, (path, kw) in sets.items():
                for images in (False, True):
                    src = open_source(SourceConfig(name="b", path=str(path)), Path("/"), 4096)  # cold caches
                    if "cache" in kw:  # a big data set read in a shuffled order: every image misses the cache
                        src._images.max_bytes = kw["cache"]
                    assert len(src) == args.n, (name, len(src))
                    runs[name, images].append(rate(src, order, images))
                    kinds[name] = type(src).__name__
        for name in sets:
            rec, full = (statistics.median(runs[name, images]) for images in (False, True))
            print(f"{name:28s} {rec:10.0f} {full:13.0f}  ({kinds[name]})")

if __name__ == "__main__":
    main()
