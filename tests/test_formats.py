"""Datasets in the formats users already have, read in place (issue 13 item 2): img2dataset / webdataset tars,
LLaVA JSON / JSONL, Hugging Face-style Parquet. Each from small files made here, each through the same
guarantees as our shards: the mapping onto our samples, bad data skipped and counted (never a crash), one line
for an unreadable file or a missing column, sizes stored for the planner, and same-seed / layout-independent /
resumable step sequences."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.convert import convert_llava
from vlpretrain.config import SourceConfig, load_config
from vlpretrain.data import formats, parquet
from vlpretrain.data.loader import DataPipeline
from vlpretrain.data.manifest import open_source
from vlpretrain.data.preprocess import decode_image
from vlpretrain.data.shard_index import index_path
from vlpretrain.data.sources import JsonlSource, ShardSource
from vlpretrain.errors import UserError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
PH = "<image_placeholder>"
MM = "data.language_ratio={start: 0.0, end: 0.0, warmup_steps: 0, shape: linear}"  # multimodal steps only
N = 24  # samples per dataset


def _img(seed: int, fmt: str = "JPEG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


BROKEN = b"\xff\xd8\xff\xe0 not really a jpeg"


def _conv(i: int, mark: bool = True) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if mark else "") + f"What is in picture {i}?"},
            {"from": "gpt", "value": f"Noise number {i}."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]


# ----------------------------------------------------------------------------- writers (what users have)


def write_img2dataset(out: Path, n: int = N, per_shard: int = 10) -> Path:
    """As img2dataset writes: 000000.tar with key.jpg|png|webp + key.txt + key.json (caption, url, ...), and the
    per-shard 000000.parquet and 000000_stats.json next to it. Sample 3's image is broken, sample 5 has no
    caption at all, sample 7 has its caption only in the json."""
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, (n + per_shard - 1) // per_shard):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                key = f"{s:05d}{i:04d}"
                ext = ("jpg", "png", "webp")[i % 3]
                img = BROKEN if i == 3 else _img(i, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
                meta = {"url": f"http://x/{i}", "key": key, "status": "success", "width": 16, "height": 12,
                        "caption": None if i in (5,) else f"a caption of image {i}", "error_message": None}
                members = [(f"{key}.{ext}", img), (f"{key}.json", json.dumps(meta).encode())]
                if i not in (5, 7):
                    members.append((f"{key}.txt", f"a caption of image {i}".encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (out / f"{s:05d}.parquet").write_bytes(b"PAR1 not for us PAR1")
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return out


def write_wds(out: Path, n: int = N) -> Path:
    """webdataset's own ShardWriter: PIL images encoded by webdataset, captions (txt) and LLaVA chats (json)."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "wds-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(n):
            image = Image.open(io.BytesIO(_img(i, "PNG")))
            if i % 2:
                sample = {"__key__": f"s{i:04d}", "png": image, "txt": f"a caption of image {i}", "cls": i % 5}
            else:
                sample = {"__key__": f"s{i:04d}", "jpg": image, "json": {"conversations": _conv(i)}}
            if i == 3:
                sample = {"__key__": f"s{i:04d}", "jpg": BROKEN, "txt": "a broken image"}
            if i == 4:
                sample = {"__key__": f"s{i:04d}", "jpg": image, "json": {"conversations": "oops"}}
            sink.write(sample)
    return out


def write_llava(out: Path, n: int = N, jsonl: bool = False) -> tuple[Path, Path]:
    """LLaVA-style JSON list (or JSONL) + image folder: item 3's image is broken, item 5's file is missing, item
    6 has an unknown role, item 8 no image (text-only chat), item 9 no <image> mark (placed first)."""
    root = out / "images" / "coco"
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        item = {"id": f"id{i}", "image": f"coco/{i:03d}.jpg", "conversations": _conv(i, mark=i != 9)}
        if i == 8:
            del item["image"]
            item["conversations"] = [{"from": "human", "value": "Hi ünïcode"}, {"from": "gpt", "value": "Hello."}]
        if i == 6:
            item["conversations"][0]["from"] = "narrator"
        items.append(item)
        if i != 5 and i != 8:
            (root / f"{i:03d}.jpg").write_bytes(BROKEN if i == 3 else _img(i))
    path = out / ("llava.jsonl" if jsonl else "llava_v1_5_mix.json")
    if jsonl:
        lines = [json.dumps(it, ensure_ascii=False) for it in items]
        lines[10] = lines[10][:-5]  # a corrupt line
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8")
    return path, out / "images"


def write_parquet(out: Path, n: int = N, chat: bool = True, binary: bool = False) -> Path:
    """HF datasets layout: image struct<bytes, path> (or binary) + conversations (list of {from, value}) or a
    caption; row groups of 5 rows over two files. Row 3: broken image bytes; row 4 (chat): no assistant turn;
    row 6: null image (a text-only sample)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        raw = BROKEN if i == 3 else _img(i, "PNG")
        image = None if i == 6 else raw if binary else {"bytes": raw, "path": f"{i}.png"}
        conv = _conv(i, mark=i != 6)
        if i == 4:
            conv = conv[:1]
        rows.append({"id": f"r{i}", "image": image,
                     **({"conversations": conv} if chat else {"caption": f"a caption of image {i}"})})
    itype = pa.binary() if binary else pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("id", pa.string()), ("image", itype)]
    if chat:
        fields.append(("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))))
    else:
        fields.append(("caption", pa.string()))
    schema = pa.schema(fields)
    half = n // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        table = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(table, out / f"train-{k:05d}-of-00002.parquet", row_group_size=5)
    return out


# ----------------------------------------------------------------------------- helpers


def _src(path, type_: str = "auto", **kw):
    return open_source(SourceConfig(name="s", path=str(path), type=type_, **kw), Path("/"), 256)


def _sizes(src, tokenizer):
    return src.size_table(tokenizer, "", 2048)


def _cfg(demo_dir: Path, path: Path, *extra: str, **kw):
    opts = "".join(f", {k}: '{v}'" for k, v in kw.items())
    return load_config(TINY / "stage2.yaml", [
        f"data.root={demo_dir}", "train.init_from=", "train.eval_file=", "train.global_batch_size=8",
        "train.micro_batch_size=4", "train.seq_len=256", "data.num_workers=0", MM, "data.balance=none",
        f"data.sources=[{{name: x, path: '{path}', modality: multimodal{opts}}}]", *extra])


def _steps(pipe, k: int) -> list:
    return [next(pipe) for _ in range(k)]


def _flat(batch, what: str) -> torch.Tensor:
    # flattened: trimmed microbatches (data.trim_padding) may differ in width
    return torch.cat([getattr(mb, what).flatten() for mb in batch.microbatches])


# ----------------------------------------------------------------------------- each format's mapping


def test_img2dataset_shards_in_place(tmp_path, tokenizer):
    d = write_img2dataset(tmp_path / "laion")
    src = _src(d)  # auto: a folder of tars (its .parquet and _stats.json are ignored), not our shards
    assert isinstance(src, formats.WebDatasetSource) and len(src) == N
    assert [p.name for p in src.reader.paths] == ["00000.tar", "00001.tar", "00002.tar"]
    rec = src.record(1)
    assert rec == {"text": PH + "a caption of image 1", "category": "caption", "images": ["png"]}
    assert src.record(7)["text"] == PH + "a caption of image 7"  # the json's caption
    assert torch.equal(src.image(2, 0, src.record(2)), decode_image(_img(2, "WEBP")))
    sizes = _sizes(src, tokenizer)
    assert set(sizes.reasons) == {5} and "caption" in sizes.reasons[5]
    assert sizes.images.tolist() == [0 if i == 5 else 1 for i in range(N)]
    assert "sizes" in json.loads(index_path(d / "00000.tar").read_text())  # stored for the next start
    with pytest.raises(ValueError, match="undecodable"):
        src.image(3, 0, src.record(3))  # the loader blanks it and counts it (bad_images)


def test_webdataset_shardwriter_output(tmp_path, tokenizer):
    d = write_wds(tmp_path / "wds")
    src = _src(d / "wds-{000000..000002}.tar")
    assert isinstance(src, formats.WebDatasetSource) and len(src) == N
    assert src.record(1) == {"text": PH + "a caption of image 1", "category": "caption", "images": ["png"]}
    chat = src.record(2)
    assert chat["images"] == ["jpg"] and chat["conversation"][0] == {"role": "User",
                                                                      "content": PH + "\nWhat is in picture 2?"}
    assert [t["role"] for t in chat["conversation"]] == ["User", "Assistant", "User", "Assistant"]
    assert torch.equal(src.image(1, 0, src.record(1)), decode_image(_img(1, "PNG")))  # lossless round trip
    sizes = _sizes(src, tokenizer)
    assert set(sizes.reasons) == {4}  # "conversations": "oops"
    with pytest.raises(ValueError):
        src.image(3, 0, src.record(3))


def test_llava_json_reads_like_the_converted_shards(tmp_path, tokenizer):
    path, images = write_llava(tmp_path)
    src = _src(path, image_root=str(images))
    assert isinstance(src, formats.LlavaSource) and len(src) == N
    sizes = _sizes(src, tokenizer)
    assert set(sizes.reasons) == {5, 6}
    assert "image file not found" in sizes.reasons[5] and "narrator" in sizes.reasons[6]
    report = convert_llava(path, images, tmp_path / "shards")
    # the converter decodes every image and drops item 3 too; read in place, its image is blanked when decoded
    assert report.written == N - 3 and sum(report.skipped.values()) == 3
    shards = _src(tmp_path / "shards")
    assert isinstance(shards, ShardSource) and not isinstance(shards, formats.WebDatasetSource)
    ref = _sizes(shards, tokenizer)
    good = [i for i in range(N) if i not in (3, 5, 6)]
    for k, i in enumerate(good):  # the same sample text, sizes and image bytes as `data_tools convert llava`
        a, b = src.record(i), shards.record(k)
        assert a["conversation"] == b["conversation"], i
        assert (sizes.text[i], sizes.labels[i], sizes.images[i]) == (ref.text[k], ref.labels[k], ref.images[k])
        if a["images"]:
            assert torch.equal(src.image(i, 0, a), shards.image(k, 0, b))
    assert src.record(9)["conversation"][0]["content"].startswith(PH + "\n")  # no mark: image first
    assert src.record(8)["images"] == [] and "ünïcode" in src.record(8)["conversation"][0]["content"]
    # stored sizes: a second open does not read the samples
    again = _src(path, image_root=str(images))
    again.record = None
    assert _sizes(again, tokenizer).text.tolist() == sizes.text.tolist()
    # JSONL: a corrupt line is one bad sample
    jpath, _ = write_llava(tmp_path / "j", jsonl=True)
    jsrc = _src(jpath)  # auto: a .jsonl of LLaVA items; images default to the file's folder
    assert isinstance(jsrc, formats.LlavaSource)
    jsizes = _sizes(jsrc, tokenizer)
    assert "corrupt JSON" in jsizes.reasons[10]
    assert "image file not found" in jsizes.reasons[0]  # images/coco/..., not coco/... next to the file
    # pickled (spawned DataLoader workers): reads the same
    back = pickle.loads(pickle.dumps(src))
    assert back.record(11) == src.record(11) and torch.equal(back.image(11, 0, back.record(11)),
                                                             src.image(11, 0, src.record(11)))


@pytest.mark.parametrize("binary", [False, True], ids=["struct-chat", "binary-caption"])
def test_parquet_by_row_group(tmp_path, tokenizer, monkeypatch, binary):
    import pyarrow.parquet as pq

    d = write_parquet(tmp_path / "pq", chat=not binary, binary=binary)
    calls = []
    orig = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        calls.append((i, tuple(columns or ())))
        return orig(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq, "read_table", None)  # never a whole file
    src = _src(d)
    assert isinstance(src, parquet.ParquetSource) and len(src) == N and len(src.units) == 6
    sizes = _sizes(src, tokenizer)
    text = "conversations" if not binary else "caption"
    # sizing reads the text column of every row group, and the image column only of the one with a null image
    assert sorted(set(calls)) == sorted({(u, (text,)) for u in range(3)} | {(1, ("image",))}), calls
    assert set(sizes.reasons) == ({4} if not binary else set())
    assert sizes.images.tolist() == [0 if i == 6 or i in sizes.reasons else 1 for i in range(N)]
    calls.clear()
    src = pickle.loads(pickle.dumps(src))  # as a spawned worker gets it: no cached row groups
    rec = src.record(13)
    assert calls == [(0, (text,))]  # row 13 = second file, row 1 of its first row group
    assert torch.equal(src.image(13, 0, rec), decode_image(_img(13, "PNG")))
    assert calls[-1] == (0, ("image",)) and len(calls) == 2
    if binary:
        assert rec == {"text": PH + "a caption of image 13", "category": "caption", "images": ["0"]}
    else:
        assert rec["conversation"][1] == {"role": "Assistant", "content": "Noise number 13."}
    assert src.key(13) == "s/train-00001-of-00002/1"
    with pytest.raises(ValueError, match="undecodable"):
        src.image(3, 0, src.record(3))
    back = pickle.loads(pickle.dumps(src))
    assert back.record(20) == src.record(20)
    calls.clear()
    again = _src(d)
    assert _sizes(again, tokenizer).text.tolist() == sizes.text.tolist() and calls == []  # stored sizes


def test_unreadable_file_or_missing_column_is_one_line(tmp_path):
    d = write_parquet(tmp_path / "pq", chat=False)
    for kw, match in [({"text_column": "answer"}, "no column 'answer'"),
                      ({"image_column": "id"}, "not an image column")]:
        with pytest.raises(UserError, match=match) as err:
            _src(d, **kw)
        assert "\n" not in str(err.value) and str(err.value).startswith("data source 's':")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "n": [1]}), tmp_path / "notext.parquet")
    with pytest.raises(UserError, match="no text column"):
        _src(tmp_path / "notext.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        _src(tmp_path / "junk.parquet")
    (tmp_path / "bad.json").write_text('[{"id": 1}, {"id": ')
    with pytest.raises(UserError, match="not a valid JSON list") as err:
        _src(tmp_path / "bad.json")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="data source 's'"):
        _src(tmp_path / "missing.json")


def test_auto_detection_keeps_our_formats(demo_dir):
    assert type(_src(demo_dir / "shards" / "captions-000000.tar")) is ShardSource
    assert type(_src(demo_dir / "sft.jsonl")) is JsonlSource


# ----------------------------------------------------------------------------- the pipeline's guarantees


FORMATS = {
    "img2dataset": lambda d: (write_img2dataset(d / "laion"), {}),
    "webdataset": lambda d: (write_wds(d / "wds"), {}),
    "llava": lambda d: (lambda p: (p[0], {"image_root": str(p[1])}))(write_llava(d)),
    "parquet": lambda d: (write_parquet(d / "pq"), {}),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_determinism_layout_resume_and_bad_data(fmt, demo_dir, tokenizer, tmp_path):
    path, kw = FORMATS[fmt](tmp_path)
    cfg = _cfg(demo_dir, path, **kw)
    whole = _steps(DataPipeline(cfg, tokenizer), 4)
    again = _steps(DataPipeline(cfg, tokenizer), 4)  # same seed: same samples, same tensors
    assert [b.samples_digest for b in whole] == [b.samples_digest for b in again]
    assert all(torch.equal(_flat(a, "tokens"), _flat(b, "tokens")) for a, b in zip(whole, again))
    other = _steps(DataPipeline(_cfg(demo_dir, path, "train.seed=1", **kw), tokenizer), 4)
    assert [b.samples_digest for b in other] != [b.samples_digest for b in whole]
    # dp = 2: each rank builds its half; together they are the dp = 1 step, tokens and images
    ranks = [DataPipeline(cfg, tokenizer, dp_rank=r, dp_size=2) for r in range(2)]
    for ref in whole[:2]:
        parts = [next(p) for p in ranks]
        assert {p.samples_digest for p in parts} == {ref.samples_digest}
        for r, part in enumerate(parts):  # rank r's rows are the dp = 1 step's microbatch r
            for what in ("tokens", "labels", "images"):
                assert torch.equal(getattr(part.microbatches[0], what), getattr(ref.microbatches[r], what)), what
    # resume from the state saved after step 2
    resumed = DataPipeline(cfg, tokenizer, state=whole[1].data_state)
    for ref in whole[2:]:
        got = next(resumed)
        assert got.samples_digest == ref.samples_digest and torch.equal(_flat(got, "tokens"), _flat(ref, "tokens"))
    # bad data: bad text skipped and counted by the plan, broken images blanked and counted, no crash
    pipe = DataPipeline(cfg, tokenizer)
    batches = _steps(pipe, 12)
    assert sum(pipe.skipped().values()) > 0
    assert sum(b.bad_images for b in batches) > 0
    assert sum(b.bad_reads for b in batches) == 0
