"""Data integrity under faults and bad input (issue 8, items 4, 5, 8 and 9):

* a shard rewritten under its index (same byte size, so the old size check passed) is re-indexed with a
  warning, at open time (mtime + fingerprint) or at read time (the tar header in front of every member);
* token ids beyond model.vocab_size in a Megatron corpus: bad chunks are skipped and counted, a corpus made
  with another tokenizer fails at start-up with one line;
* every data user error (bad shard, bad .bin/.idx, garbage tokenizer, bad eval file, duplicate source names,
  missing files) is one stderr line from ``vlpretrain train``, before the model is built, no traceback;
* the blank-image warning is given once per source.
"""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlpretrain.cli import main as cli_main
from vlpretrain.config import ConfigError, load_config
from vlpretrain.data.indexed import IndexedDatasetWriter
from vlpretrain.data.loader import DataPipeline
from vlpretrain.data.manifest import load_manifest
from vlpretrain.data.shard_index import fingerprint, index_path
from vlpretrain.data.shards import BadSample, ShardReader, ShardWriter

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
PH = "<image_placeholder>"
VOCAB = 2048  # the tiny model's


# ---------------------------------------------------------------------------------------------------------------
# stale shard index


def _shard(out: Path, prefix: str, n: int, word: str) -> Path:
    with ShardWriter(out, prefix) as w:
        for i in range(n):
            w.write(f"{word}{i:03d}", {"text": f"{word} sample {i}", "category": "text"})
    [shard] = w.shards
    return shard


@pytest.fixture
def rewritten(tmp_path: Path):
    """Shard A with its index, then the same path rewritten in place with other samples of the same tar size."""
    a = _shard(tmp_path / "data", "s", 300, "alpha")
    b = _shard(tmp_path / "other", "s", 300, "omega")
    assert a.stat().st_size == b.stat().st_size  # tar pads to 10 KiB records: the size check cannot tell
    old = a.stat()
    index_before = index_path(a).read_text()
    a.write_bytes(b.read_bytes())  # keeps A's (now stale) index next to it
    assert index_path(a).read_text() == index_before
    return a, old


def _stale_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "re-indexing" in r.getMessage()]


def test_rewritten_shard_of_the_same_size_is_reindexed_at_open(rewritten, caplog):
    shard, _ = rewritten
    with caplog.at_level(logging.WARNING, logger="vlpretrain.data.shard_index"):
        reader = ShardReader(shard)
        texts = [reader.read(i)["text"] for i in range(len(reader))]
    assert texts == [f"omega sample {i}" for i in range(300)]
    assert len(_stale_warnings(caplog)) == 1 and "stale index" in _stale_warnings(caplog)[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlpretrain.data.shard_index"):  # the index file was refreshed
        assert ShardReader(shard).read(7)["text"] == "omega sample 7"
    assert not _stale_warnings(caplog)


@pytest.mark.parametrize("how", ["middle of a big shard", "index without fingerprint"])
def test_change_the_fingerprint_misses_is_caught_by_the_header_check(how, tmp_path, caplog):
    """The open-time check passes (same size and first/last 64 KiB, or an older index without a fingerprint):
    the tar header read in front of every member finds the change."""
    def sample(i: int) -> tuple[str, str]:  # every sample takes 1 KiB (header + one data block)
        if how.startswith("middle"):
            return (f"mid{i:03d}", f"changed {i}") if 100 <= i < 200 else (f"k{i:03d}", f"sample {i}")
        return f"z{i:03d}", f"other {i}"

    with ShardWriter(tmp_path / "data", "s") as w:
        for i in range(300):
            w.write(f"k{i:03d}", {"text": f"sample {i}", "category": "text"})
    with ShardWriter(tmp_path / "other", "s") as w:
        for i in range(300):
            w.write(sample(i)[0], {"text": sample(i)[1], "category": "text"})
    shard, new = w.shards[0].parent.parent / "data" / "s-000000.tar", w.shards[0]
    if how.startswith("middle"):
        assert shard.stat().st_size == new.stat().st_size > 4 * 64 * 1024
        assert fingerprint(shard) == fingerprint(new) and shard.read_bytes() != new.read_bytes()
    else:
        index = json.loads(index_path(shard).read_text())
        del index["shard_hash"]
        index_path(shard).write_text(json.dumps(index))
        assert shard.stat().st_size == new.stat().st_size
    shard.write_bytes(new.read_bytes())
    with caplog.at_level(logging.WARNING, logger="vlpretrain.data"):
        reader = ShardReader(shard)
        assert not _stale_warnings(caplog)  # the open-time check cannot tell
        texts = [reader.read(i)["text"] for i in range(len(reader))]
        keys = [reader.locate(i)[1] for i in range(len(reader))]
    assert texts == [sample(i)[1] for i in range(300)] and keys == [sample(i)[0] for i in range(300)]
    warned = _stale_warnings(caplog)
    assert len(warned) == 1 and "header" in warned[0]  # warned once


def test_shard_rewritten_while_a_reader_has_it_open(tmp_path: Path, caplog):
    a = _shard(tmp_path / "data", "s", 40, "alpha")
    reader = ShardReader(a)
    assert reader.read(3)["text"] == "alpha sample 3"  # opened and read
    a.write_bytes(_shard(tmp_path / "other", "s", 30, "beta").read_bytes())  # fewer samples, in place
    with caplog.at_level(logging.WARNING, logger="vlpretrain.data.shards"):
        assert [reader.read(i)["text"] for i in range(30)] == [f"beta sample {i}" for i in range(30)]
    assert len(reader) == 40  # the sampler was sized by the old count: the missing ones are bad samples
    with pytest.raises(BadSample, match="gone"):
        reader.read(35)
    assert any("now holds 30 samples" in m for m in [r.getMessage() for r in caplog.records])


# ---------------------------------------------------------------------------------------------------------------
# token ids beyond the vocabulary


def _corpus(prefix: Path, docs: list[list[int]]) -> Path:
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return prefix


def _text_cfg(demo_dir: Path, tmp_path: Path, prefix: Path, *overrides: str):
    return load_config(TINY / "stage2.yaml", [
        f"data.root={demo_dir}", f"train.run_dir={tmp_path / 'run'}", "train.init_from=", "train.eval_file=",
        "train.global_batch_size=8", "train.micro_batch_size=4", "train.seq_len=64", "data.packing=false",
        f"data.sources=[{{name: corpus, path: '{prefix}', type: indexed, modality: text}}]",
        "data.language_ratio={start: 1.0, end: 1.0, warmup_steps: 0, shape: linear}", *overrides])


def test_out_of_vocabulary_ids_are_skipped_and_counted(demo_dir, tokenizer, tmp_path, caplog):
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, VOCAB, 40).tolist() for _ in range(12)]
    for d in (2, 7, 9):
        docs[d][17] = VOCAB + 100 * d  # a few documents from another tokenizer's id range
    prefix = _corpus(tmp_path / "corpus" / "text", docs)
    cfg = _text_cfg(demo_dir, tmp_path, prefix)
    with caplog.at_level(logging.WARNING):
        pipe = DataPipeline(cfg, tokenizer)
        batches = [next(pipe) for _ in range(6)]  # 48 draws: four epochs of 12 chunks
    for b in batches:
        for mb in b.microbatches:
            assert int(mb.tokens.max()) < VOCAB and int(mb.labels.max()) < VOCAB
    assert sum(b.bad_samples.get("corpus", 0) for b in batches) == pipe.skipped()["corpus"] >= 6
    assert sum(b.source_counts["corpus"] for b in batches) == 48  # every slot still filled
    warned = [r.getMessage() for r in caplog.records if "outside the model's vocabulary" in r.getMessage()]
    assert len(warned) == 1, warned


# ---------------------------------------------------------------------------------------------------------------
# one line, before the model is built, for every data user error


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(1, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _eval_file(tmp_path: Path, item: dict | str) -> Path:
    path = tmp_path / "evalset" / "eval.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "a.png").write_bytes(_png(0))
    good = {"question": f"{PH}What is it?", "options": ["A cat.", "A dog."], "answer": 0, "images": ["a.png"]}
    line = item if isinstance(item, str) else json.dumps({**good, **item})
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    return path


def _source(name: str, path, kind: str = "shards", modality: str = "multimodal") -> str:
    return f"{{name: {name}, path: '{path}', type: {kind}, modality: {modality}}}"


def _case(kind: str, demo_dir: Path, tmp_path: Path) -> tuple[list[str], str]:
    """(config overrides, a fragment the one error line must contain) for one kind of bad input."""
    caps = _source("captions", "shards/captions-*.tar")
    if kind == "garbage shard":
        junk = tmp_path / "junk" / "j-000000.tar"
        junk.parent.mkdir()
        junk.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return [f"data.sources=[{_source('junk', junk)}]"], "j-000000.tar"
    if kind == "bad idx":
        prefix = _corpus(tmp_path / "c" / "text", [[5, 6, 7]])
        Path(f"{prefix}.idx").write_bytes(b"NOTMEGATRON" + Path(f"{prefix}.idx").read_bytes()[11:])
        return [f"data.sources=[{caps}, {_source('corpus', prefix, 'indexed', 'text')}]"], "text.idx"
    if kind == "truncated bin":
        prefix = _corpus(tmp_path / "c" / "text", [[5, 6, 7], [8, 9]])
        Path(f"{prefix}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:-2])
        return [f"data.sources=[{caps}, {_source('corpus', prefix, 'indexed', 'text')}]"], "text.bin"
    if kind == "missing bin":
        prefix = _corpus(tmp_path / "c" / "text", [[5, 6, 7]])
        Path(f"{prefix}.bin").unlink()
        return [f"data.sources=[{caps}, {_source('corpus', prefix, 'auto', 'text')}]"], "text.bin"
    if kind == "missing shard":
        return [f"data.sources=[{caps}, {_source('gone', tmp_path / 'gone-000000.tar')}]"], "gone-000000.tar"
    if kind == "missing jsonl":
        return [f"data.sources=[{caps}, {_source('gone', tmp_path / 'gone.jsonl', 'jsonl')}]"], "gone.jsonl"
    if kind == "garbage tokenizer":
        tok = tmp_path / "tokenizer.json"
        tok.write_text('{"version": "1.0", "truncation": nul')
        return [f"data.tokenizer={tok}"], "tokenizer.json"
    if kind == "tokenizer without specials":
        tok = tmp_path / "tokenizer.json"
        data = json.loads((demo_dir / "tokenizer.json").read_text())
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != PH]
        data["model"]["vocab"].pop(PH, None)
        tok.write_text(json.dumps(data))
        return [f"data.tokenizer={tok}"], "tokenizer.json"
    if kind.startswith("eval "):
        item = {"eval not json": '{"question": "x", "options": [',
                "eval missing image": {"images": ["missing.png"]},
                "eval bad answer": {"answer": 5},
                "eval placeholder mismatch": {"question": "No image here?"},
                "eval too long": {"question": PH + "word " * 400}}[kind]  # no answer token fits
        return [f"train.eval_file={_eval_file(tmp_path, item)}"], "eval.jsonl"
    if kind == "duplicate source names":
        return [f"data.sources=[{caps}, {_source('captions', 'shards/ocr-*.tar')}]"], "'captions'"
    if kind == "incompatible corpus":
        prefix = _corpus(tmp_path / "c" / "text", [[VOCAB + i, 7, 9] for i in range(30)])
        return [f"data.sources=[{caps}, {_source('corpus', prefix, 'indexed', 'text')}]"], "model.vocab_size=2048"
    raise AssertionError(kind)


CASES = ["garbage shard", "bad idx", "truncated bin", "missing bin", "missing shard", "missing jsonl",
         "garbage tokenizer", "tokenizer without specials", "eval not json", "eval missing image", "eval bad answer",
         "eval placeholder mismatch", "eval too long", "duplicate source names", "incompatible corpus"]


@pytest.mark.parametrize("kind", CASES)
def test_data_user_error_is_one_line_before_the_model(kind, demo_dir, tmp_path, capsys, monkeypatch):
    import vlpretrain.train.trainer as trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the input error was found")

    monkeypatch.setattr(trainer, "ParallelModel", no_model)
    overrides, fragment = _case(kind, demo_dir, tmp_path)
    rc = cli_main(["train", "--config", str(TINY / "stage2.yaml"), "--set", f"data.root={demo_dir}",
                   f"train.run_dir={tmp_path / 'run'}", "train.init_from=", "train.eval_file=", "train.steps=1",
                   "train.global_batch_size=4", "train.micro_batch_size=4", "train.seq_len=128", *overrides])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(("error:", "config error:", "data error:")), lines
    assert fragment in lines[0] and "Traceback" not in err


def test_garbage_tokenizer_in_a_subprocess(tmp_path):
    """The real command line: one stderr line, no traceback, exit status 2."""
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes(b"\x00\xff garbage")
    cmd = [sys.executable, "-m", "vlpretrain", "train", "--config", str(TINY / "stage1.yaml"), "--set",
           f"data.tokenizer={tok}", f"train.run_dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: tokenizer") and str(tok) in lines[0]


def test_data_tools_garbage_tokenizer_is_one_line(tmp_path, capsys):
    from data_tools.__main__ import main as data_tools_main

    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n')
    tok = tmp_path / "tokenizer.json"
    tok.write_text("not json")
    rc = data_tools_main(["tokenize", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(tok),
                          "--output-prefix", str(tmp_path / "out" / "c"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: tokenizer {tok}"), err


def test_eval_command_checks_the_eval_file_first(demo_dir, tmp_path, capsys, monkeypatch):
    import vlpretrain.models.vlm as vlm

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the eval file was checked")

    monkeypatch.setattr(vlm, "build_model", no_model)
    path = _eval_file(tmp_path, {"answer": -1})
    rc = cli_main(["eval", "--config", str(TINY / "stage3.yaml"), "--set", f"data.root={demo_dir}",
                   "--eval-file", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().startswith("error: eval file") and "line 2" in err and len(err.splitlines()) == 1


def test_duplicate_source_names_in_a_manifest(tmp_path):
    manifest = tmp_path / "mix.yaml"
    manifest.write_text("sources:\n"
                        "  - {name: web, path: a/*.tar, modality: multimodal}\n"
                        "  - {name: books, path: b/text, type: indexed, modality: text}\n"
                        "  - {path: c/web, type: indexed, modality: text}\n")  # unnamed: named by its stem
    cfg = load_config(TINY / "stage2.yaml", [f"data.manifest={manifest}", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"sources\[2\]: duplicate source name 'web' \(also .*sources\[0\]\)"):
        load_manifest(cfg.data)


# ---------------------------------------------------------------------------------------------------------------
# the blank-image warning


def test_blank_image_warning_once_per_source(demo_dir, tokenizer, tmp_path, caplog):
    out = tmp_path / "broken"
    with ShardWriter(out, "b", validate=False) as w:
        for i in range(6):
            w.write(f"k{i}", {"text": f"{PH}Picture {i}.", "category": "caption"}, [b"\x89PNG\r\n\x1a\n junk" * 4])
    cfg = load_config(TINY / "stage2.yaml", [
        f"data.root={demo_dir}", "train.init_from=", "train.eval_file=", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.seq_len=128", "data.packing=false",
        f"data.sources=[{_source('broken', out)}]",
        "data.language_ratio={start: 0.0, end: 0.0, warmup_steps: 0, shape: linear}"])
    with caplog.at_level(logging.WARNING):
        pipe = DataPipeline(cfg, tokenizer)
        blanks = sum(next(pipe).bad_images for _ in range(3))
    assert blanks == 12
    warned = [r.getMessage() for r in caplog.records if "blank image" in r.getMessage()]
    assert len(warned) == 1 and "broken" in warned[0], warned
