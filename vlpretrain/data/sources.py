"""Data sources behind one interface: our own formats.

Our own formats, all random access (the sampler decides the order); ``formats.py`` adds the formats users
already have (``webdataset`` tars from img2dataset / webdataset's writers, ``llava`` JSON, ``parquet``):

* ``shards``: webdataset tar shards with an index (multimodal samples, SFT conversations); the JSON member is
  read for planning, the image members only by the rank that feeds the vision encoder.
* ``indexed``: a Megatron .bin/.idx token corpus (text); each document is cut into chunks of at most
  ``seq_len`` tokens, and one chunk is one sample.
* ``jsonl``: one JSON sample per line, images as paths relative to the file (the demo's simple format).

Which reader opens which source, and the manifest that names them: ``manifest.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from vlpretrain.config import SourceConfig
from vlpretrain.data.indexed import IndexedDataset
from vlpretrain.data.preprocess import decode_image, load_image
from vlpretrain.data.shard_index import index_path
from vlpretrain.data.shards import BadSample, ShardReader
from vlpretrain.data.sizes import (
    SizeTable,
    announce,
    chunk_id_range,
    compute_entries,
    idx_fingerprint,
    size_encoder,
    sizes_key,
    table_from_entries,
    try_write_json_atomic,
)
from vlpretrain.errors import UserError


def json_member(reader: ShardReader, i: int, shard, key: str) -> dict:
    """Sample ``i``'s ``.json`` member as a dict; a corrupt or non-object one is a BadSample (skipped, counted)."""
    try:
        rec = json.loads(reader.read_member(i, "json").decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, BadSample):
            raise
        raise BadSample(f"corrupt JSON member: {e}", shard, key) from None
    if not isinstance(rec, dict):
        raise BadSample("JSON member is not an object", shard, key)
    return rec

class Source:
    """``len()`` samples; ``record(i)`` is the text side (dict with "text" or "conversation" and "images": one
    entry per placeholder); ``image(i, j)`` decodes image j of sample i (uint8 (3, H, W)); ``tokens(i)`` gives
    pre-tokenized ids for corpora (else None)."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.name = cfg.name or Path(cfg.path).stem
        self.modality = cfg.modality

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        return f"{self.name}/{i}"

    def where(self, i: int) -> dict:
        """Where sample ``i`` lives, for a user to find it (file or shard, and its place there)."""
        return {"file": self.cfg.path}

    def content_id(self) -> str:
        """What the sample indices refer to: a cheap, stable hash of the source's files (what its size index is
        keyed by), independent of its name, path and seq_len. The data state knows a source by it
        (``plan_state.py``): renamed or moved, the same files continue; other files are another source."""
        return _digest(type(self).__name__, len(self), *self._content_parts())

    def _content_parts(self) -> list:
        raise NotImplementedError

    def record(self, i: int) -> dict:
        raise NotImplementedError

    def tokens(self, i: int) -> np.ndarray | None:
        return None

    def image(self, i: int, j: int, record: dict) -> torch.Tensor:
        raise NotImplementedError

    def size_table(self, tokenizer, system_prompt: str, vocab_size: int) -> SizeTable:
        """Every sample's size (``sizes.py``), from the stored size index when it matches, else computed (and
        stored, best effort)."""
        raise NotImplementedError


def _digest(*parts) -> str:
    return hashlib.blake2b(json.dumps([str(p) for p in parts]).encode(), digest_size=12).hexdigest()


class JsonlSource(Source):
    def __init__(self, cfg: SourceConfig, path: Path):
        super().__init__(cfg)
        self.root = path.parent
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"data source '{self.name}': {path} is not UTF-8 text (byte {e.start})") from None
        self.lines = [line for line in text.splitlines() if line.strip()]
        self.path = path
        self.content_hash = hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()

    def size_table(self, tokenizer, system_prompt: str, vocab_size: int) -> SizeTable:
        key, side = sizes_key(tokenizer, system_prompt), Path(f"{self.path}.sizes.json")
        try:
            stored = json.loads(side.read_text(encoding="utf-8"))
            if (stored.get("key"), stored.get("file_hash")) == (key, self.content_hash) and \
                    len(stored["samples"]) == len(self):
                return table_from_entries(stored["samples"])
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            pass
        t0 = time.perf_counter()
        entries = compute_entries(len(self), self.record, size_encoder(tokenizer, system_prompt))
        try_write_json_atomic(side, {"format": "vlpretrain.sizes", "key": key, "file_hash": self.content_hash,
                                 "samples": entries})
        announce(self.name, len(self), t0)
        return table_from_entries(entries)

    def __len__(self) -> int:
        return len(self.lines)

    def record(self, i: int) -> dict:
        try:
            rec = json.loads(self.lines[i])
        except ValueError as e:
            raise BadSample(f"corrupt JSON line: {e}", self.cfg.path, str(i)) from None
        if not isinstance(rec, dict):
            raise BadSample("JSON line is not an object", self.cfg.path, str(i))
        return rec

    def key(self, i: int) -> str:
        return f"{self.name}/{i}"

    def where(self, i: int) -> dict:
        return {"file": str(self.path), "line": i}  # among its non-blank lines, from 0

    def _content_parts(self) -> list:
        return [self.content_hash]

    def image(self, i: int, j: int, record: dict) -> torch.Tensor:
        path = self.root / record["images"][j]
        try:
            return load_image(path)
        except (OSError, ValueError) as e:
            raise BadSample(f"unreadable image {path}: {e}", self.cfg.path, str(i)) from None


class ShardSource(Source):
    def __init__(self, cfg: SourceConfig, paths: list[Path], reader: ShardReader | None = None):
        super().__init__(cfg)
        self.reader = reader or ShardReader(paths)

    def _sizes_key(self, tokenizer, system_prompt: str) -> str:
        return sizes_key(tokenizer, system_prompt)

    def __len__(self) -> int:
        return len(self.reader)

    def key(self, i: int) -> str:
        shard, key = self.reader.locate(i)
        return f"{self.name}/{shard.stem}/{key}"

    def where(self, i: int) -> dict:
        shard, key = self.reader.locate(i)
        return {"shard": str(shard), "member_key": key}

    def _content_parts(self) -> list:
        # each shard's fingerprint (size + first and last 64 KiB; an older index: its size and sample keys)
        return [ix.get("shard_hash") or _digest(ix.get("shard_bytes"), *[x["key"] for x in ix["samples"]])
                for ix in self.reader.indexes]

    def record(self, i: int) -> dict:
        shard, key = self.reader.locate(i)
        return json_member(self.reader, i, shard, key)

    def image(self, i: int, j: int, record: dict) -> torch.Tensor:
        shard, key = self.reader.locate(i)
        raw = self.reader.read_member(i, str(record["images"][j]).lower())
        return decode_image(raw, str(shard), key)

    def size_table(self, tokenizer, system_prompt: str, vocab_size: int) -> SizeTable:
        """Sizes kept in each shard's index (``"sizes"``); shards without them for this tokenizer are sized
        now and their index rewritten with them."""
        key, encoder, entries, computed = self._sizes_key(tokenizer, system_prompt), None, [], 0
        t0 = time.perf_counter()
        reader = self.reader
        for s, index in enumerate(reader.indexes):
            stored = index.pop("sizes", None)  # kept here, not in the reader's memory
            n, start = len(index["samples"]), reader._starts[s]
            if isinstance(stored, dict) and stored.get("key") == key and len(stored.get("samples", ())) == n:
                entries += stored["samples"]
                continue
            encoder = encoder or size_encoder(tokenizer, system_prompt)
            part = compute_entries(n, lambda j, start=start: self.record(start + j), encoder)
            entries += part
            computed += n
            try_write_json_atomic(index_path(reader.paths[s]), {**index, "sizes": {"key": key, "samples": part}})
        if computed:
            announce(self.name, computed, t0)
        return table_from_entries(entries)


class IndexedSource(Source):
    """A token corpus: document d of n tokens gives ceil(n / chunk) samples of at most ``chunk`` tokens."""

    def __init__(self, cfg: SourceConfig, prefix: str, chunk: int):
        super().__init__(cfg)
        self.ds = IndexedDataset(prefix)
        lengths = self.ds.sequence_lengths.astype(np.int64)
        per_seq = np.maximum((lengths + chunk - 1) // chunk, 0)
        self.seq_of_chunk = np.repeat(np.arange(len(lengths)), per_seq)
        first = np.concatenate([[0], np.cumsum(per_seq)[:-1]]) if len(per_seq) else np.zeros(0, np.int64)
        self.offset_of_chunk = (np.arange(len(self.seq_of_chunk)) - np.repeat(first, per_seq)) * chunk
        self.chunk = chunk

    def __len__(self) -> int:
        return len(self.seq_of_chunk)

    def key(self, i: int) -> str:
        return f"{self.name}/{int(self.seq_of_chunk[i])}:{int(self.offset_of_chunk[i])}"

    def where(self, i: int) -> dict:
        return {"file": f"{self.ds.prefix}.bin", "document": int(self.seq_of_chunk[i]),
                "offset": int(self.offset_of_chunk[i])}

    def content_id(self) -> str:
        """The corpus (its .idx fingerprint and .bin size), not its chunking: a new seq_len re-cuts the same
        corpus (``plan_state.py`` has the rule)."""
        return _digest(type(self).__name__, idx_fingerprint(self.ds.prefix))

    def record(self, i: int) -> dict:
        return {"images": []}

    def tokens(self, i: int) -> np.ndarray:
        seq, off = int(self.seq_of_chunk[i]), int(self.offset_of_chunk[i])
        n = min(self.chunk, int(self.ds.sequence_lengths[seq]) - off)
        return np.asarray(self.ds.get(seq, off, n), dtype=np.int64)

    def chunk_lengths(self) -> np.ndarray:
        lengths = self.ds.sequence_lengths.astype(np.int64)[self.seq_of_chunk]
        return np.minimum(self.chunk, lengths - self.offset_of_chunk)

    def size_table(self, tokenizer, system_prompt: str, vocab_size: int) -> SizeTable:
        """A chunk of n ids is BOS + n ids: n inputs, all supervised. The ids' range per chunk (for the
        vocabulary check) comes from ``PREFIX.sizes.npz``, built by one pass over the .bin when missing."""
        n = self.chunk_lengths().astype(np.int32)
        side, key = Path(f"{self.ds.prefix}.sizes.npz"), f"{idx_fingerprint(self.ds.prefix)}:{self.chunk}"
        lo = hi = None
        try:
            with np.load(side, allow_pickle=False) as z:
                if str(z["key"]) == key and len(z["max_id"]) == len(n):
                    lo, hi = z["min_id"], z["max_id"]
        except (OSError, ValueError, KeyError):
            pass
        if lo is None:
            t0 = time.perf_counter()
            starts = self.ds.sequence_pointers[self.seq_of_chunk] // self.ds.dtype.itemsize + self.offset_of_chunk
            lo, hi = chunk_id_range(self.ds, starts, n)
            tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp.npz")
            try:
                np.savez(tmp, key=np.array(key), min_id=lo, max_id=hi)
                os.replace(tmp, side)
            except OSError:
                tmp.unlink(missing_ok=True)
            announce(self.name, len(n), t0)
        reasons = {}
        for i in np.flatnonzero((hi >= vocab_size) | (lo < 0)).tolist():
            bad = int(hi[i]) if hi[i] >= vocab_size else int(lo[i])
            reasons[i] = (f"token id {bad} is outside the model's vocabulary (model.vocab_size={vocab_size})")
        return SizeTable(n.copy(), n.copy(), np.zeros(len(n), np.int32), reasons)
