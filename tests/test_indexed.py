"""Megatron indexed dataset (.bin/.idx) reader/writer and the `data_tools tokenize` tool."""
from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from vlpretrain.data.indexed import (
    MAGIC,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    best_dtype,
)

FIXTURES = Path(__file__).parent / "fixtures" / "megatron_indexed"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
NAMES = sorted(EXPECTED)


def _write(prefix, docs, dtype):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            w.add_document(doc)


# ---------------------------------------------------------------------------- Megatron's own files
@pytest.mark.parametrize("name", NAMES)
def test_reads_megatron_fixture(name):
    exp = EXPECTED[name]
    ds = IndexedDataset(FIXTURES / name)
    ds.check()
    assert ds.dtype == np.dtype(exp["dtype"])
    assert len(ds) == ds.num_documents == len(exp["documents"])
    assert ds.sequence_modes is None
    assert ds.document_indices.tolist() == list(range(len(exp["documents"]) + 1))
    assert ds.sequence_lengths.tolist() == [len(d) for d in exp["documents"]]
    for i, doc in enumerate(exp["documents"]):
        assert ds[i].dtype == ds.dtype
        assert ds[i].tolist() == doc
        assert ds.document(i).tolist() == doc
    assert [a.tolist() for a in ds[3:6]] == exp["documents"][3:6]
    assert ds[-1].tolist() == exp["documents"][-1]
    assert ds.get(2, 1, 3).tolist() == exp["documents"][2][1:4]
    assert ds.get(2, 5).tolist() == exp["documents"][2][5:]
    assert ds.num_tokens == sum(map(len, exp["documents"]))
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds.get(0, 0, len(exp["documents"][0]) + 1)
    again = pickle.loads(pickle.dumps(ds))  # by prefix, for DataLoader workers
    assert again[4].tolist() == exp["documents"][4]


@pytest.mark.parametrize("name", NAMES)
def test_writer_is_byte_identical_to_megatron(tmp_path, name):
    exp = EXPECTED[name]
    _write(tmp_path / "out", exp["documents"], exp["dtype"])
    for ext in ("bin", "idx"):
        assert (tmp_path / f"out.{ext}").read_bytes() == (FIXTURES / f"{name}.{ext}").read_bytes(), ext
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.idx"]  # no temporaries left
    # The packed bulk path writes the same bytes.
    docs = exp["documents"]
    with IndexedDatasetWriter(tmp_path / "packed", exp["dtype"]) as w:
        w.add_packed(np.concatenate([np.asarray(d) for d in docs]), [len(d) for d in docs])
    for ext in ("bin", "idx"):
        assert (tmp_path / f"packed.{ext}").read_bytes() == (FIXTURES / f"{name}.{ext}").read_bytes(), ext


# ---------------------------------------------------------------------------- megatron-core itself
def _megatron_core():
    return pytest.importorskip(
        "megatron.core.datasets.indexed_dataset",
        reason="megatron-core not installed (pip install 'megatron-core>=0.16,<0.17' on Python 3.10/3.11, "
               "later versions need 3.12): the comparison with its IndexedDataset / IndexedDatasetBuilder is skipped",
    )


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("multimodal", [False, True])
def test_same_as_megatron_core(tmp_path, dtype, multimodal):
    """Our writer and megatron-core's IndexedDatasetBuilder write the same bytes for the same calls (one-sequence
    documents, empty ones, multi-sequence documents, a document with no sequence, add_item + end_document,
    modes); each reader reads the other's files to the same tokens, sequence by sequence and part by part."""
    mi = _megatron_core()
    import torch

    rng = np.random.default_rng(7)
    hi = 65535 if dtype == np.uint16 else 102400
    docs = [rng.integers(0, hi, size=int(rng.integers(0, 300))).astype(dtype) for _ in range(200)]
    docs[5] = docs[5][:0]
    multi = [[docs[1], docs[2]], [], [docs[3]], [docs[5], docs[7]]]
    modes = rng.integers(0, 3, size=len(docs) + 7).tolist() if multimodal else None
    mode = iter(modes or [0] * (len(docs) + 7))

    b = mi.IndexedDatasetBuilder(mi.get_bin_path(str(tmp_path / "mc")), dtype=dtype, multimodal=multimodal)
    for d in docs:
        b.add_item(torch.from_numpy(d.copy()), next(mode))
        b.end_document()
    for seqs in multi:
        b.add_document(np.concatenate(seqs) if seqs else np.empty(0, dtype), [len(s) for s in seqs],
                       [next(mode) for _ in seqs] if multimodal else None)
    b.add_item(torch.from_numpy(docs[4].copy()), next(mode))
    b.add_item(torch.from_numpy(docs[6].copy()), next(mode))
    b.end_document()
    b.finalize(mi.get_idx_path(str(tmp_path / "mc")))

    mode = iter(modes or [0] * (len(docs) + 7))
    with IndexedDatasetWriter(tmp_path / "ours", dtype, multimodal=multimodal) as w:
        for d in docs:
            w.add_document(d, mode=next(mode))
        for seqs in multi:
            w.add_sequences(seqs, modes=[next(mode) for _ in seqs] if multimodal else None)
        w.add_sequence(docs[4], mode=next(mode))
        w.add_sequence(docs[6], mode=next(mode))
        w.end_document()
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"mc.{ext}").read_bytes(), ext

    ours = IndexedDataset(tmp_path / "mc")  # megatron-core's files, our reader
    theirs = mi.IndexedDataset(str(tmp_path / "ours"), multimodal=multimodal)  # ours, megatron-core's reader
    np.testing.assert_array_equal(ours.sequence_lengths, theirs.sequence_lengths)
    np.testing.assert_array_equal(ours.sequence_pointers, theirs.index.sequence_pointers)
    np.testing.assert_array_equal(ours.document_indices, theirs.document_indices)
    if multimodal:
        np.testing.assert_array_equal(ours.sequence_modes, theirs.index.sequence_modes)
        assert ours.sequence_modes.tolist() == modes
    assert len(ours) == len(theirs) == len(docs) + 7 and ours.num_documents == len(docs) + len(multi) + 1
    unpack = (lambda x: x[0]) if multimodal else (lambda x: x)
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours[i], unpack(theirs[i]))
        n = int(ours.sequence_lengths[i])
        if n > 2:
            np.testing.assert_array_equal(ours.get(i, 1, n - 2), unpack(theirs.get(i, 1, n - 2)))
    for j in range(ours.num_documents):
        seqs = ours.document_sequences(j)
        want = [unpack(theirs[k]) for k in seqs]
        np.testing.assert_array_equal(ours.document(j), np.concatenate(want) if want else np.empty(0, dtype))
    del theirs  # megatron-core unmaps on delete: nothing of it may be used after this line


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "uint16", "int32", "int64", "float32", "float64"])
def test_round_trip_random(tmp_path, dtype):
    rng = np.random.default_rng(0)
    hi = min(np.iinfo(dtype).max, 10**6) if np.dtype(dtype).kind in "iu" else 1000
    docs = [rng.integers(0, hi, size=int(rng.integers(0, 50))).astype(dtype) for _ in range(40)]
    docs[3] = docs[3][:0]  # a zero-length document
    _write(tmp_path / "rt", docs, dtype)
    ds = IndexedDataset(tmp_path / "rt")
    ds.check()
    assert ds.dtype == np.dtype(dtype) and len(ds) == 40 and ds.num_documents == 40
    for got, want in zip(ds[:], docs):
        np.testing.assert_array_equal(got, want)
    assert ds[3].size == 0 and ds.sequence_lengths[3] == 0


def test_empty_documents_follow_megatron(tmp_path):
    """add_document([]) = Megatron add_item(empty)+end_document(): a zero-length sequence.
    add_sequences([]) = Megatron add_document(empty, lengths=[]) (what preprocess_data.py writes for an
    empty text): a document with no sequence. Multi-sequence documents keep their boundaries."""
    with IndexedDatasetWriter(tmp_path / "e", np.uint16) as w:
        w.add_document([1, 2, 3])
        w.add_document([])
        w.add_sequences([])
        w.add_sequences([[4, 5], [6]])
        w.add_sequence([7])
        w.add_sequence([8, 9])
        w.end_document()
    ds = IndexedDataset(tmp_path / "e")
    ds.check()
    assert ds.sequence_lengths.tolist() == [3, 0, 2, 1, 1, 2]
    assert ds.sequence_pointers.tolist() == [0, 6, 6, 10, 12, 14]
    assert ds.document_indices.tolist() == [0, 1, 2, 2, 4, 6]
    assert ds.num_documents == 5 and len(ds) == 6
    assert [ds.document(j).tolist() for j in range(5)] == [[1, 2, 3], [], [], [4, 5, 6], [7, 8, 9]]
    assert list(ds.document_sequences(3)) == [2, 3]

    # A dataset with nothing in it: empty .bin (numpy cannot mmap it; the reader copes).
    with IndexedDatasetWriter(tmp_path / "none", np.int32):
        pass
    ds = IndexedDataset(tmp_path / "none")
    assert len(ds) == 0 and ds.num_documents == 0 and (tmp_path / "none.bin").stat().st_size == 0


def test_modes_round_trip(tmp_path):
    with IndexedDatasetWriter(tmp_path / "m", np.int32, multimodal=True) as w:
        w.add_document([1, 2], mode=1)
        w.add_sequences([[3], [4, 5]], modes=[0, 2])
    ds = IndexedDataset(tmp_path / "m")
    assert ds.sequence_modes.tolist() == [1, 0, 2]
    assert [a.tolist() for a in ds[:]] == [[1, 2], [3], [4, 5]]


def test_dtype_selection_and_range_checks(tmp_path):
    assert best_dtype(2048) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(102400) == np.int32  # DeepSeek-LLM's vocab
    assert best_dtype(None) == np.int32
    with IndexedDatasetWriter(tmp_path / "r", np.uint16) as w:
        w.add_document([0, 65535])
        with pytest.raises(ValueError, match="does not fit"):
            w.add_document([65536])
        with pytest.raises(ValueError, match="does not fit"):
            w.add_document([-1])
        with pytest.raises(TypeError, match="integers"):
            w.add_document([1.5])
    assert IndexedDataset(tmp_path / "r")[0].tolist() == [0, 65535]
    with pytest.raises(TypeError, match="not in the Megatron"):
        IndexedDatasetWriter(tmp_path / "x", np.uint32)


def test_crash_leaves_no_dataset(tmp_path):
    _write(tmp_path / "c", [[1, 2, 3]], np.int32)
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "c2", np.int32) as w:
            w.add_document([1, 2])
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.idx"]
    # While a rewrite is in progress the old pair stays readable; finalize swaps in the new one.
    w = IndexedDatasetWriter(tmp_path / "c", np.int32)
    w.add_document([9])
    assert IndexedDataset(tmp_path / "c")[0].tolist() == [1, 2, 3]
    w.finalize()
    assert IndexedDataset(tmp_path / "c")[0].tolist() == [9]


# ---------------------------------------------------------------------------- corrupt inputs
def _copy_fixture(tmp_path, name="uint16_docs"):
    for ext in ("bin", "idx"):
        shutil.copy(FIXTURES / f"{name}.{ext}", tmp_path / f"d.{ext}")
    return tmp_path / "d"


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_magic(tmp_path):
    prefix = _copy_fixture(tmp_path)
    data = bytearray((tmp_path / "d.idx").read_bytes())
    data[:4] = b"JUNK"
    (tmp_path / "d.idx").write_bytes(bytes(data))
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    assert "magic" in _one_line(e)


def test_unsupported_version(tmp_path):
    prefix = _copy_fixture(tmp_path)
    data = bytearray((tmp_path / "d.idx").read_bytes())
    data[len(MAGIC) : len(MAGIC) + 8] = struct.pack("<Q", 2)
    (tmp_path / "d.idx").write_bytes(bytes(data))
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    assert "version 2" in _one_line(e)


def test_truncated_bin(tmp_path):
    prefix = _copy_fixture(tmp_path)
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-2])
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    msg = _one_line(e)
    assert "truncated" in msg and f"{len(data) - 2} bytes" in msg and f"{len(data)} bytes" in msg


def test_truncated_idx(tmp_path):
    prefix = _copy_fixture(tmp_path)
    data = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(data[:-8])
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    assert "does not match its header" in _one_line(e)


def test_missing_files(tmp_path):
    prefix = _copy_fixture(tmp_path)
    (tmp_path / "d.idx").unlink()
    assert not IndexedDataset.exists(prefix)
    with pytest.raises(FileNotFoundError) as e:
        IndexedDataset(prefix)
    assert ".idx" in _one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        IndexedDataset(tmp_path / "nothing")
    assert "not found" in _one_line(e)


# ---------------------------------------------------------------------------- tokenize tool
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Vision-language pretraining mixes captions, OCR and interleaved text.",
    "",  # tokenizes to nothing -> a document with no sequence (as Megatron's preprocess_data.py)
    "Megatron indexed datasets store tokens back to back; the index holds lengths and pointers.",
    "Ünïcödé and emoji 🚀 survive the byte-level round trip.",
] * 120  # 600 documents: several chunks, so ordering across workers matters


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_tools.tokenizer import SPECIAL_TOKEN_IDS, train_tokenizer

    root = tmp_path_factory.mktemp("tokenize")
    tok = train_tokenizer([t for t in TEXTS[:5] if t], 300, root / "tokenizer.json")
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(TEXTS)]
    lines.insert(7, "{not json")  # invalid JSON
    lines.insert(20, json.dumps({"content": "wrong key"}))  # missing key
    lines.insert(30, "")  # blank lines are ignored, not counted
    half = len(lines) // 2
    (root / "a.jsonl").write_text("\n".join(lines[:half]) + "\n", encoding="utf-8")
    (root / "b.jsonl").write_text("\n".join(lines[half:]) + "\n", encoding="utf-8")
    return root, tok, SPECIAL_TOKEN_IDS["eos"]


def test_tokenize_tool(corpus, capsys):
    from data_tools.__main__ import main
    from data_tools.tokenize_corpus import tokenize_corpus

    root, tok, eos = corpus
    inputs = [root / "a.jsonl", root / "b.jsonl"]
    s1 = tokenize_corpus(inputs, root / "tokenizer.json", root / "w1" / "corpus", workers=1, append_eos=True)
    rc = main(["tokenize", "--input", *map(str, inputs), "--tokenizer", str(root / "tokenizer.json"),
               "--output-prefix", str(root / "w2" / "corpus"), "--workers", "2", "--append-eos", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "skipped 2 bad lines" in out and "invalid json 1" in out and "missing key 1" in out

    for ext in ("bin", "idx"):  # identical whatever the worker count
        assert (root / "w1" / f"corpus.{ext}").read_bytes() == (root / "w2" / f"corpus.{ext}").read_bytes()
    assert s1.bad_lines == 2 and s1.bad["invalid_json"] == 1 and s1.bad["missing_key"] == 1
    assert s1.documents == len(TEXTS) and s1.empty_documents == 120 and s1.lines == len(TEXTS) + 2
    assert s1.dtype == "uint16"

    ds = IndexedDataset(root / "w1" / "corpus")
    ds.check()
    assert ds.dtype == np.uint16
    assert ds.num_documents == len(TEXTS) and len(ds) == len(TEXTS) - 120 == s1.sequences
    assert ds.num_tokens == s1.tokens
    assert list(ds.document_sequences(2)) == []  # the empty text: no sequence, no eos
    for j in (0, 1, 3, 4, len(TEXTS) - 1):
        ids = ds.document(j).tolist()
        assert ids[-1] == eos and eos not in ids[:-1]
        assert tok.decode(ids[:-1]) == TEXTS[j]
        assert ids[:-1] == tok.encode(TEXTS[j], add_special_tokens=False).ids

    # Without --append-eos: the same documents minus the eos.
    s3 = tokenize_corpus(inputs, root / "tokenizer.json", root / "w3" / "corpus", progress=False)
    assert s3.tokens == s1.tokens - s1.sequences
    assert IndexedDataset(root / "w3" / "corpus").document(0).tolist() == ds.document(0).tolist()[:-1]


def test_tokenize_errors(corpus, tmp_path):
    from data_tools.tokenize_corpus import tokenize_corpus

    root, _, _ = corpus
    with pytest.raises(FileNotFoundError, match="input file not found"):
        tokenize_corpus([tmp_path / "missing.jsonl"], root / "tokenizer.json", tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        tokenize_corpus([root / "a.jsonl"], tmp_path / "none.json", tmp_path / "o")


def test_progress_line():
    import io

    from data_tools.tokenize_corpus import TokenizeStats, _Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = _Progress(1000, True, stream)
    stats = TokenizeStats(documents=10, tokens=5000, bytes_read=500)
    bar.update(stats, final=True)
    text = stream.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    assert " 50.0%" in text and "10 docs" in text and "5,000 tokens" in text and "tok/s" in text and "ETA" in text
    quiet = Tty()
    _Progress(1000, False, quiet).update(stats, final=True)
    assert quiet.getvalue() == ""
