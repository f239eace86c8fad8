"""webdataset shards: writer/reader round trip, index, robustness, converters and the inspect tool."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.__main__ import main as cli_main
from data_tools.convert import DEMO_MANIFEST, convert_captions, convert_demo, convert_llava
from data_tools.inspect_data import grid_size, inspect_shards
from vlpretrain.data.encoding import SampleEncoder
from vlpretrain.data.preprocess import decode_image
from vlpretrain.data.shard_index import ShardError, build_index, index_path
from vlpretrain.data.shards import (
    BadSample,
    ShardReader,
    ShardWriter,
)

PH = "<image_placeholder>"


def _image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (24, 16)) -> bytes:
    """Noise images, so that PNG data spans several 512-byte tar blocks."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _samples(tmp_path: Path) -> list[tuple[str, dict, list]]:
    jpg_path = tmp_path / "photo.JPG"
    jpg_path.write_bytes(_image_bytes(99, "JPEG"))
    out = []
    for i in range(7):
        if i % 4 == 0:
            rec, images = {"text": f"plain text number {i}", "category": "text"}, []
        elif i % 4 == 1:
            rec, images = {"text": f"{PH}A caption {i}.", "category": "caption", "id": f"c{i}"}, [_image_bytes(i)]
        elif i % 4 == 2:
            rec = {"text": f"Look {PH} and then {PH} done.", "category": "interleaved", "source": "web"}
            images = [_image_bytes(i), jpg_path]
        else:
            rec = {"conversation": [{"role": "User", "content": f"{PH}\nWhat is it? ünïcode"},
                                    {"role": "Assistant", "content": "Noise."}], "category": "sft"}
            images = [_image_bytes(i)]
        out.append((f"sample_{i:03d}", rec, images))
    return out


def _write(out_dir: Path, samples, **kwargs) -> list[Path]:
    with ShardWriter(out_dir, "part", **kwargs) as writer:
        for key, rec, images in samples:
            writer.write(key, rec, images)
    return writer.shards


@pytest.fixture
def written(tmp_path: Path):
    samples = _samples(tmp_path)
    return samples, _write(tmp_path / "shards", samples, max_samples_per_shard=3)


def test_round_trip_and_random_access(written, tmp_path: Path) -> None:
    samples, paths = written
    assert [p.name for p in paths] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    assert not list(paths[0].parent.glob(".*tmp"))  # no temporary files left
    reader = ShardReader(paths)
    assert len(reader) == 7 and reader.keys() == [k for k, _, _ in samples] and not reader.problems
    sequential = list(reader)
    for (key, rec, images), got in zip(samples, sequential):
        assert got["__key__"] == key
        expected_bytes = [im if isinstance(im, bytes) else Path(im).read_bytes() for im in images]
        assert got["images"] == expected_bytes
        assert got["image_names"] == [f"{j}.{'jpg' if isinstance(im, Path) else 'png'}" for j, im in enumerate(images)]
        body = {k: v for k, v in got.items() if k not in ("images", "image_names", "__key__", "__shard__")}
        assert body == {"source": "part", **rec}  # the writer's source unless the record has one
    for i in reversed(range(7)):  # random access == sequential
        assert reader.read(i) == sequential[i]
    assert reader[-1] == sequential[-1]
    assert reader.locate(4) == (paths[1], "sample_004")
    with pytest.raises(IndexError):
        reader.read(7)
    # the writer's index is exactly what a header scan finds
    for p in paths:
        assert json.loads(index_path(p).read_text()) == build_index(p, write=False)
    # deterministic bytes
    again = _write(tmp_path / "again", samples, max_samples_per_shard=3)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    # byte limit: one sample per shard
    tiny = _write(tmp_path / "tiny", samples, max_bytes=2048)
    assert len(tiny) == 7 and ShardReader(tiny).keys() == reader.keys()


def test_writer_checks(tmp_path: Path, written) -> None:
    _, paths = written
    writer = ShardWriter(tmp_path / "w", "x")
    with pytest.raises(ValueError, match="no dots"):
        writer.write("a.b", {"text": "t", "category": "text"})
    with pytest.raises(ValueError, match="placeholders"):
        writer.write("a", {"text": f"{PH} t", "category": "caption"}, [])
    with pytest.raises(FileNotFoundError):
        writer.write("a", {"text": f"{PH} t", "category": "caption"}, [tmp_path / "nope.png"])
    writer.write("a", {"text": "t", "category": "text"})
    with pytest.raises(ValueError, match="duplicate"):
        writer.write("a", {"text": "t", "category": "text"})
    assert len(writer.close()) == 1
    with pytest.raises(FileExistsError):
        ShardWriter(paths[0].parent, "part")
    # overwrite: stale shards beyond the new ones are removed
    with ShardWriter(paths[0].parent, "part", overwrite=True) as w:
        w.write("only", {"text": "t", "category": "text"})
    assert sorted(p.name for p in paths[0].parent.glob("part-*")) == ["part-000000.tar", "part-000000.tar.idx.json"]


def test_crash_never_leaves_half_shard(tmp_path: Path) -> None:
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, "c", max_samples_per_shard=2) as writer:
            for i in range(3):
                writer.write(f"k{i}", {"text": "t", "category": "text"})
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["c-000000.tar", "c-000000.tar.idx.json"]
    assert ShardReader(out).keys() == ["k0", "k1"]
    # a failure while writing a member (disk full, ...): the open shard is dropped and the writer closed
    writer = ShardWriter(tmp_path / "full", "f")
    writer.write("k0", {"text": "t", "category": "text"})
    original, calls = writer._add, []

    def failing_add(name, data):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(name, data)

    writer._add = failing_add
    with pytest.raises(OSError):
        writer.write("k1", {"text": f"{PH}x", "category": "caption"}, [_image_bytes(0)])
    assert writer.closed and list((tmp_path / "full").iterdir()) == []


def test_webdataset_tarwriter_shard_is_indexed(tmp_path: Path) -> None:
    import webdataset as wds

    shard = tmp_path / "foreign.tar"
    raw = [_image_bytes(1), _image_bytes(2, "JPEG")]
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "s0", "json": {"text": f"{PH}{PH}two", "category": "interleaved",
                                              "images": ["0.png", "1.jpg"]}, "0.png": raw[0], "1.jpg": raw[1]})
        sink.write({"__key__": "s1", "json": {"text": "no images listed", "category": "text"}})
        sink.write({"__key__": "s2", "json": {"text": f"{PH}inferred", "category": "caption"}, "jpg": raw[1]})
    index = build_index(shard)
    assert index_path(shard).is_file() and index["complete"]
    reader = ShardReader(shard)
    assert reader.keys() == ["s0", "s1", "s2"]
    assert reader.read(0)["images"] == raw and reader.read(1)["images"] == []
    assert reader.read(2)["images"] == [raw[1]]  # no "images" field: image members by name


def test_our_shards_read_by_webdataset(written) -> None:
    import webdataset as wds

    samples, paths = written
    ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False)
    got = list(ds)
    assert [s["__key__"] for s in got] == [k for k, _, _ in samples]
    for s, (_, rec, images) in zip(got, samples):
        meta = json.loads(s["json"])
        assert meta["category"] == rec["category"] and len(meta["images"]) == len(images)
        assert all(name in s for name in meta["images"])


def test_truncated_shard(tmp_path: Path, caplog) -> None:
    samples = [(f"k{i}", {"text": f"{PH}caption {i}", "category": "caption"}, [_image_bytes(i, size=(40, 40))])
               for i in range(5)]
    [shard] = _write(tmp_path, samples)
    entry = json.loads(index_path(shard).read_text())["samples"][2]["members"]["0.png"]
    cut = entry[0] + entry[1] // 2  # in the middle of sample 2's image
    shard.write_bytes(shard.read_bytes()[:cut])  # the index file is now stale (other size)
    reader = ShardReader(shard)
    assert reader.keys() == ["k0", "k1", "k2"] and str(shard) in reader.problems
    assert reader.read(0)["images"] == samples[0][2] and reader.read(1)["text"] == f"{PH}caption 1"
    with pytest.raises(BadSample, match="truncated") as err:
        reader.read(2)
    assert err.value.key == "k2" and err.value.shard == str(shard)
    # cut inside a header: the samples before it are still fine
    shard.write_bytes(shard.read_bytes()[:entry[0] - 512 - 100])
    reader = ShardReader(shard)
    assert reader.keys()[:2] == ["k0", "k1"] and reader.read(1)["images"] == samples[1][2]
    assert reader.problems


def test_corrupt_json_and_missing_member(tmp_path: Path) -> None:
    samples = [(f"k{i}", {"text": f"{PH}caption {i}", "category": "caption"}, [_image_bytes(i)]) for i in range(3)]
    [shard] = _write(tmp_path, samples)
    index = json.loads(index_path(shard).read_text())
    data = bytearray(shard.read_bytes())
    offset, _ = index["samples"][1]["members"]["json"]
    data[offset] = ord("#")  # same size: the index stays valid
    shard.write_bytes(bytes(data))
    reader = ShardReader(shard)
    assert reader.read(0)["__key__"] == "k0" and reader.read(2)["__key__"] == "k2"
    with pytest.raises(BadSample, match="corrupt JSON") as err:
        reader.read(1)
    assert err.value.key == "k1"
    # an index entry naming a member the tar lacks
    del reader.indexes[0]["samples"][2]["members"]["0.png"]
    with pytest.raises(BadSample, match="no member"):
        reader.read(2)


def test_decode_image() -> None:
    raw = _image_bytes(5)
    img = decode_image(raw)
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 24)
    expected = np.array(Image.open(io.BytesIO(raw)).convert("RGB"))
    assert torch.equal(img, torch.from_numpy(expected).permute(2, 0, 1))
    grey = io.BytesIO()
    Image.new("L", (5, 3), 7).save(grey, format="PNG")
    assert decode_image(grey.getvalue()).shape == (3, 3, 5)
    for bad in (b"not an image", raw[: len(raw) // 2], b""):
        with pytest.raises(BadSample, match="undecodable"):
            decode_image(bad, shard="s.tar", key="k")


def test_missing_and_unindexable_shards(written, tmp_path: Path) -> None:
    _, paths = written
    missing = tmp_path / "shards" / "part-000009.tar"
    with pytest.raises(FileNotFoundError, match="part-000009.tar"):
        ShardReader([paths[0], missing])
    (tmp_path / "no_shards").mkdir()
    with pytest.raises(FileNotFoundError, match="no_shards"):
        ShardReader(tmp_path / "no_shards")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(ShardError, match="junk.tar"):
        ShardReader(junk)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardError, match="empty.tar"):
        ShardReader(empty)


def test_llava_converter(tmp_path: Path, capsys) -> None:
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    (images / "sub" / "a.png").write_bytes(_image_bytes(1))
    (images / "c.jpg").write_bytes(_image_bytes(3, "JPEG"))
    data = [
        {"id": "one", "image": "sub/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Noise."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "two", "image": "b.jpg", "conversations": [
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "Missing."}]},
        {"id": "three", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "four", "image": "c.jpg", "conversations": [  # no <image> mark: placeholder added
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Grey."}]},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert cli_main(["convert", "llava", str(src), str(images), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 samples" in printed and "missing image 1" in printed
    reader = ShardReader(out)
    assert reader.keys() == ["00000000", "00000002", "00000003"]
    first = reader.read(0)
    assert first["category"] == "sft" and first["source"] == "llava" and first["id"] == "one"
    assert first["conversation"][0] == {"role": "User", "content": f"{PH}\nWhat is shown?"}
    assert [t["role"] for t in first["conversation"]] == ["User", "Assistant", "User", "Assistant"]
    assert first["images"] == [(images / "sub" / "a.png").read_bytes()]
    assert reader.read(1)["images"] == [] and reader.read(1)["id"] == "three"
    assert reader.read(2)["conversation"][0]["content"] == f"{PH}\nDescribe."
    report = convert_llava(src, images, tmp_path / "again", verify=False)
    assert report.written == 3 and dict(report.skipped) == {"missing image": 1}
    assert [p.read_bytes() for p in report.shards] == [p.read_bytes() for p in sorted(out.glob("*.tar"))]


def test_captions_converter(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("b", "a", "c"):
        (folder / f"{name}.png").write_bytes(_image_bytes(ord(name)))
    (folder / "a.txt").write_text("An a.\n")
    (folder / "b.txt").write_text("   ")
    report = convert_captions(folder, tmp_path / "side")
    assert report.written == 1 and dict(report.skipped) == {"empty caption": 1, "no caption": 1}
    mapping = tmp_path / "captions.csv"
    mapping.write_text("file,caption\nb.png,Bee.\nc.png,Sea.\ngone.png,Lost.\n")
    report = convert_captions(folder, tmp_path / "csv", captions=mapping)
    assert report.written == 2 and dict(report.skipped) == {"no caption": 1, "missing image": 1}
    rec = ShardReader(report.shards).read(1)
    assert rec["text"] == f"{PH}Sea." and rec["category"] == "caption" and rec["id"] == "c.png"


@pytest.fixture(scope="module")
def demo_shards(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_shards")
    convert_demo(demo_dir, out, verbose=False)
    return out


def test_demo_converter(demo_dir: Path, demo_shards: Path, tokenizer) -> None:
    manifest = json.loads((demo_shards / DEMO_MANIFEST).read_text())
    assert sorted(manifest) == ["captions", "interleaved", "ocr", "sft"]
    encoder = SampleEncoder(tokenizer, image_tokens=4, seq_len=4096)
    for name, info in manifest.items():
        rows = [json.loads(line) for line in (demo_dir / f"{name}.jsonl").read_text().splitlines()]
        assert info["samples"] == len(rows) and not info["skipped"]
        reader = ShardReader(demo_shards / info["shards"][0])
        assert len(reader) == len(rows)
        for i in (0, len(rows) - 1):
            rec, row = reader.read(i), rows[i]
            assert rec["id"] == row["id"] and rec["category"] == row["kind"] and rec["source"] == name
            assert rec.get("text") == row.get("text") and rec.get("conversation") == row.get("conversation")
            assert rec["images"] == [(demo_dir / p).read_bytes() for p in row["images"]]
            assert [decode_image(b).shape for b in rec["images"]] == [(3, 128, 128)] * len(row["images"])
            encoded = encoder.encode({**rec, "images": rec["image_names"]})
            assert encoded.tokens.count(tokenizer.image_id) == 4 * len(row["images"])


def test_inspect(demo_dir: Path, demo_shards: Path, tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.png"
    argv = ["inspect", str(demo_shards), "--tokenizer", str(demo_dir / "tokenizer.json"), "--grid", str(grid),
            "--n", "8"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((demo_shards / DEMO_MANIFEST).read_text())
    total = sum(v["samples"] for v in manifest.values())
    assert f"samples: {total}" in printed and "token length (image_tokens=576)" in printed
    assert f"caption           {manifest['captions']['samples']}" in printed
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size == grid_size(8, 4) == (4 * 192, 2 * (192 + 112))
    assert cli_main(argv[:4] + ["--json", "--limit", "50"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 50 and stats["token_length"]["count"] == 50
    assert stats["token_length"]["min"] >= 576 and sum(stats["images_per_sample"].values()) == 50
    direct = inspect_shards(sorted(demo_shards.glob("sft-*.tar")))
    assert direct["categories"] == {"sft": manifest["sft"]["samples"]} and "token_length" not in direct
