"""Datasets in the formats users already have, read in place (no conversion), behind the ``Source`` interface.

* ``webdataset``: tar shards as img2dataset writes them (``key.jpg|png|webp`` + ``key.txt`` and/or ``key.json``
  with "caption"; its per-shard ``.parquet`` / ``_stats.json`` are not tars and are never read) and as
  webdataset's ``TarWriter`` / ``ShardWriter`` write them (any image members + ``txt`` / ``json``). A ``json``
  with LLaVA ``conversations`` gives a chat sample. Random access through the same byte-offset index as our
  shards (``shards.ShardReader``: built in memory at the first start, stored next to the shard with the sizes).
* ``llava``: a LLaVA-style JSON list (or JSONL) ``[{"id", "image": "rel/path.jpg", "conversations": [{"from":
  "human"|"gpt", "value": "<image>\\n..."}]}]``; images relative to ``image_root`` (default: the file's folder).
  The file is parsed once at open for the byte span of every item; a sample is one positional read.
* ``parquet``: local Parquet files (the Hugging Face datasets layout): an image column (struct {bytes, path},
  binary, or a list of those) and a text column (a caption string, or LLaVA conversations), via pyarrow, one row
  group at a time (a small per-process cache), never a whole file.

Mapping onto our samples (the same as ``data_tools convert``, so a converted copy gives the same tokens):
captions become ``<image_placeholder> * n + caption`` (all supervised, like our caption samples), LLaVA
conversations become our chat format (human -> User, gpt -> Assistant: loss on the answers only), ``<image>``
becomes ``<image_placeholder>``, and a sample with images but no mark gets them at the start of its first user
turn (LLaVA's convention).

Bad data, as for our own formats: a sample whose text is unusable (corrupt JSON, unknown role, no caption,
image/mark mismatch, a LLaVA image file that does not exist) is recorded as bad when its size is indexed and
skipped by every rank (counted); an image that does not decode is replaced by a blank and counted
(``bad_images``); an unreadable file or a missing column is one line at start-up.

Sizes (what the global planner reads) are stored like the others': in the shard index for ``webdataset``,
``<file>.sizes.json`` next to a ``llava`` file or each ``.parquet`` file, keyed by the tokenizer, the format and
its options, and the file's content (hash or fingerprint).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from vlpretrain.config import SourceConfig
from vlpretrain.data.preprocess import decode_image
from vlpretrain.data.shard_index import fingerprint
from vlpretrain.data.shards import IMAGE_EXTENSIONS, IMAGE_PLACEHOLDER, BadSample, count_placeholders
from vlpretrain.data.sizes import (
    SizeTable,
    announce,
    compute_entries,
    size_encoder,
    sizes_key,
    table_from_entries,
    try_write_json_atomic,
)
from vlpretrain.data.sources import ShardSource, Source, json_member
from vlpretrain.errors import UserError

LLAVA_ROLES = {"human": "User", "user": "User", "gpt": "Assistant", "assistant": "Assistant"}
LLAVA_IMAGE = "<image>"
IMAGE_COLUMNS = ("image", "images", "jpg", "png", "img")
TEXT_COLUMNS = ("conversations", "conversation", "text", "caption", "txt")
CAPTION_FIELDS = ("caption", "text", "txt")


# ----------------------------------------------------------------------------- record mapping


def caption_record(caption, n_images: int, category: str = "caption") -> dict:
    """A caption with ``n_images`` images -> our sample: the placeholders first (unless the text has them)."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("no caption")
    text = caption.strip()
    n = text.count(IMAGE_PLACEHOLDER)
    if n == 0:
        text = IMAGE_PLACEHOLDER * n_images + text
    elif n != n_images:
        raise ValueError(f"{n} image placeholders but {n_images} images")
    return {"text": text, "category": category}


def chat_record(turns_in, n_images: int, category: str = "sft") -> dict:
    """LLaVA ``conversations`` ([{from, value}]) or our ``conversation`` ([{role, content}]) -> our chat sample
    (as ``data_tools convert llava`` maps them). Raises ValueError on an unusable conversation."""
    if isinstance(turns_in, str):  # some Parquet exports keep the conversation as a JSON string
        try:
            turns_in = json.loads(turns_in)
        except ValueError:
            raise ValueError("conversations is not valid JSON") from None
    if not isinstance(turns_in, list) or not turns_in:
        raise ValueError("no conversation")
    turns = []
    for turn in turns_in:
        if not isinstance(turn, dict):
            raise ValueError("conversation turn is not an object")
        if "from" in turn:
            role = LLAVA_ROLES.get(str(turn.get("from", "")).lower())
            content = turn.get("value")
        else:
            role = LLAVA_ROLES.get(str(turn.get("role", "")).lower())
            content = turn.get("content")
        if role is None:
            raise ValueError(f"unknown role {turn.get('from', turn.get('role'))!r}")
        turns.append({"role": role, "content": str(content or "").replace(LLAVA_IMAGE, IMAGE_PLACEHOLDER)})
    if not any(t["role"] == "Assistant" for t in turns):
        raise ValueError("conversation without an assistant turn")
    record = {"conversation": turns, "category": category}
    n = count_placeholders(record)
    if n == 0 and n_images:
        first_user = next((t for t in turns if t["role"] == "User"), None)
        if first_user is None:
            raise ValueError(f"0 image placeholders but {n_images} images")
        first_user["content"] = IMAGE_PLACEHOLDER * n_images + "\n" + first_user["content"]
    elif n != n_images:
        raise ValueError(f"{n} image placeholders but {n_images} images")
    return record


def llava_record(item) -> dict:
    """One LLaVA item -> our chat sample with "images": the relative image paths."""
    if not isinstance(item, dict):
        raise ValueError("item is not an object")
    image = item.get("image")
    if image in (None, "", []):
        rels = []
    elif isinstance(image, str):
        rels = [image]
    elif isinstance(image, list) and all(isinstance(r, str) for r in image):
        rels = list(image)
    else:
        raise ValueError("'image' must be a path or a list of paths")
    record = chat_record(item.get("conversations"), len(rels))
    record["images"] = rels
    return record


def _cached_sizes(side: Path, key: str, content: str, n: int) -> SizeTable | None:
    try:
        stored = json.loads(side.read_text(encoding="utf-8"))
        if (stored.get("key"), stored.get("file_hash")) == (key, content) and len(stored["samples"]) == n:
            return table_from_entries(stored["samples"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return None


def _store_sizes(side: Path, key: str, content: str, entries: list) -> None:
    try_write_json_atomic(side, {"format": "vlpretrain.sizes", "key": key, "file_hash": content, "samples": entries})


def _tagged_key(tokenizer, system_prompt: str, *parts: str) -> str:
    """``sizes_key`` plus what this format's mapping depends on (another format or option: other sizes)."""
    text = "\0".join([sizes_key(tokenizer, system_prompt), *parts])
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


# ----------------------------------------------------------------------------- webdataset tars


def _image_members(members) -> list[str]:
    return sorted((m for m in members if m.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS),
                  key=lambda m: (len(m.split(".")[0]), m))


def webdataset_record(reader, i: int) -> dict:
    """Sample ``i`` of a webdataset-layout tar -> our sample; "images" names the image members."""
    s, entry = reader._locate(i)
    path, key, members = reader.paths[s], entry["key"], entry["members"]
    if entry.get("error"):
        raise BadSample(entry["error"], path, key)
    meta: dict = json_member(reader, i, path, key) if "json" in members else {}
    names = meta.get("images")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n.lower() in members
                                                      for n in names)):
        names = _image_members(members)
    names = [n.lower() for n in names]
    try:
        if "conversations" in meta or "conversation" in meta:
            rec = chat_record(meta.get("conversations", meta.get("conversation")), len(names),
                              meta.get("category") or "sft")
        else:
            caption = None
            if "txt" in members:
                try:
                    caption = reader.read_member(i, "txt").decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError("txt member is not UTF-8") from None
            if caption is None or not caption.strip():
                caption = next((meta[f] for f in CAPTION_FIELDS if isinstance(meta.get(f), str)), None)
            rec = caption_record(caption, len(names), meta.get("category") or "caption")
    except BadSample:
        raise
    except ValueError as e:
        raise BadSample(str(e), path, key) from None
    rec["images"] = names
    return rec


class WebDatasetSource(ShardSource):
    """Tar shards in webdataset layout written by other tools (img2dataset, webdataset's TarWriter/ShardWriter):
    the same index and reads as our shards, another mapping from members to samples."""

    SIZES_TAG = "webdataset-1"

    def record(self, i: int) -> dict:
        return webdataset_record(self.reader, i)

    def _sizes_key(self, tokenizer, system_prompt: str) -> str:
        return _tagged_key(tokenizer, system_prompt, self.SIZES_TAG)


# ----------------------------------------------------------------------------- LLaVA JSON / JSONL


class _Pread:
    """Positional reads of one file, with a descriptor per process (DataLoader workers fork or pickle us)."""

    def __init__(self, path: Path):
        self.path, self._fd, self._pid = path, None, None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_fd": None, "_pid": None}

    def read(self, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
        chunks, done = [], 0
        while done < size:
            chunk = os.pread(self._fd, size - done, offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)


def json_spans(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Byte [start, end) of every item of a JSON list (one parse, nothing kept), or of every non-empty line of a
    JSONL file; and whether it is a list. A list that does not parse is a UserError (its items cannot be told
    apart); a bad JSONL line is one bad sample (found when it is read)."""
    head = data.lstrip()[:1]
    if head != b"[":
        starts, ends, pos = [], [], 0
        for line in data.split(b"\n"):
            if line.strip():
                starts.append(pos)
                ends.append(pos + len(line))
            pos += len(line) + 1
        return np.asarray(starts, np.int64), np.asarray(ends, np.int64), False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text (byte {e.start})") from None
    ascii_only = text.isascii()
    dec, ws = json.JSONDecoder(), " \t\r\n"
    starts, ends = [], []
    pos, n = text.index("[") + 1, len(text)
    last_char, last_byte = 0, 0

    def to_byte(c: int) -> int:  # char offset -> byte offset, walking forward only
        nonlocal last_char, last_byte
        if ascii_only:
            return c
        last_byte += len(text[last_char:c].encode("utf-8"))
        last_char = c
        return last_byte

    while True:
        while pos < n and text[pos] in ws:
            pos += 1
        if pos < n and text[pos] == "]" and not starts:
            break
        try:
            _, end = dec.raw_decode(text, pos)
        except ValueError as e:
            raise UserError(f"{where} is not a valid JSON list: {e}") from None
        starts.append(to_byte(pos))
        ends.append(to_byte(end))
        pos = end
        while pos < n and text[pos] in ws:
            pos += 1
        if pos < n and text[pos] == ",":
            pos += 1
        elif pos < n and text[pos] == "]":
            break
        else:
            raise UserError(f"{where} is not a valid JSON list: expected ',' or ']' at character {pos}")
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64), True


class LlavaSource(Source):
    """A LLaVA-style JSON list or JSONL file; sample i is item i, its images under ``image_root``."""

    SIZES_TAG = "llava-1"

    def __init__(self, cfg: SourceConfig, path: Path, image_root: Path):
        super().__init__(cfg)
        self.path, self.image_root = path, image_root
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        self.file_hash = content_hash(data)
        self.starts, self.ends, _ = json_spans(data, str(path))
        self.file = _Pread(path)

    def __len__(self) -> int:
        return len(self.starts)

    def record(self, i: int) -> dict:
        raw = self.file.read(int(self.starts[i]), int(self.ends[i] - self.starts[i]))
        try:
            item = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadSample(f"corrupt JSON: {e}", self.cfg.path, str(i)) from None
        try:
            return llava_record(item)
        except ValueError as e:
            raise BadSample(str(e), self.cfg.path, str(i)) from None

    def _checked(self, i: int) -> dict:
        """The record, with its image files checked to exist (at indexing: a missing one makes the sample bad)."""
        rec = self.record(i)
        for rel in rec["images"]:
            if not (self.image_root / rel).is_file():
                raise BadSample(f"image file not found: {self.image_root / rel}", self.cfg.path, str(i))
        return rec

    def image(self, i: int, j: int, record: dict) -> torch.Tensor:
        p = self.image_root / record["images"][j]
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise BadSample(f"image file {p}: {e.strerror or e}", self.cfg.path, str(i)) from None
        return decode_image(raw, self.cfg.path, str(i))

    def size_table(self, tokenizer, system_prompt: str, vocab_size: int) -> SizeTable:
        key = _tagged_key(tokenizer, system_prompt, self.SIZES_TAG, str(self.image_root.resolve()))
        side = Path(f"{self.path}.sizes.json")
        table = _cached_sizes(side, key, self.file_hash, len(self))
        if table is None:
            entries = timed_entries(self.name, len(self), self._checked, tokenizer, system_prompt)
            _store_sizes(side, key, self.file_hash, entries)
            table = table_from_entries(entries)
        return table


# ----------------------------------------------------------------------------- Parquet


def parquet_files(path: Path) -> list[Path]:
    """A .parquet file, a directory (its *.parquet, recursively, sorted) or a glob."""
    import glob

    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet file in directory {path}")
        return files
    text = str(path)
    if any(c in text for c in "*?[") and not path.exists():
        files = sorted(Path(m) for m in glob.glob(text) if m.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"no Parquet file matches {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return [path]


class RowGroupCache:
    """The row groups' columns last read in this process, up to ``max_items`` and ``max_bytes`` (the newest one
    is always kept). In a shuffled order a row group is read once per sample it holds unless it stays here."""

    def __init__(self, max_items: int, max_bytes: int | None = None):
        self.max_items, self.max_bytes, self.items, self.bytes = max_items, max_bytes, OrderedDict(), 0

    def get(self, key, load):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key][0]
        value = load()
        size = int(getattr(value, "nbytes", 0))
        self.items[key] = (value, size)
        self.bytes += size
        while len(self.items) > 1 and (len(self.items) > self.max_items
                                       or (self.max_bytes is not None and self.bytes > self.max_bytes)):
            self.bytes -= self.items.popitem(last=False)[1][1]
        return value


def image_value_kind(arrow_type) -> str:
    """'struct' ({bytes, path}), 'binary', 'list-struct' or 'list-binary'; '' if not an image column."""
    import pyarrow as pa

    def single(t) -> str:
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return "struct"
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return "binary"
        return ""

    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        inner = single(arrow_type.value_type)
        return f"list-{inner}" if inner else ""
    return single(arrow_type)


def image_bytes(value, image_root: Path, where: str, key: str) -> bytes:
    """One image cell (bytes, or {bytes, path}) -> its encoded bytes (a path: a file under ``image_root``)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            p = Path(value["path"])
            p = p if p.is_absolute() else image_root / p
            try:
                return p.read_bytes()
            except OSError as e:
                raise BadSample(f"image file {p}: {e.strerror or e}", where, key) from None
    raise BadSample("empty image cell", where, key)


def timed_entries(name: str, n: int, read_record, tokenizer, system_prompt: str) -> list:
    t0 = time.perf_counter()
    entries = compute_entries(n, read_record, size_encoder(tokenizer, system_prompt))
    announce(name, n, t0)
    return entries


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _count_images(value) -> int:
    if value is None:
        return 0
    if isinstance(value, list):
        return sum(_count_images(v) for v in value)
    if isinstance(value, dict):
        return int(bool(value.get("bytes") or value.get("path")))
    return int(bool(value))


class ParquetSource(Source):
    """Rows of local Parquet files (in file order, then row order); each read touches one row group's column."""

    SIZES_TAG = "parquet-1"
    # per process: image columns of recent row groups (a big row group of big images is always kept alone)
    IMAGE_CACHE_BYTES = 256 << 20

    def __init__(self, cfg: SourceConfig, files: list[Path], image_root: Path | None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(cfg)
        self.files, self.image_root = files, image_root
        self.text_col = self.image_col = None
        self.units: list[tuple[int, int]] = []  # (file, row group) in order
        starts, file_first = [0], []
        for f_i, f in enumerate(files):
            try:
                pf = pq.ParquetFile(f)
            except (OSError, pa.ArrowException) as e:
                raise UserError(f"{f}: not a readable Parquet file ({e})") from None
            self._check_columns(f, pf.schema_arrow)
            file_first.append(starts[-1])
            for rg in range(pf.metadata.num_row_groups):
                self.units.append((f_i, rg))
                starts.append(starts[-1] + pf.metadata.row_group(rg).num_rows)
        self.unit_starts = np.asarray(starts, np.int64)
        self.file_first = file_first
        self._init_caches()

    def _check_columns(self, f: Path, schema) -> None:
        import pyarrow as pa

        names = schema.names

        def pick(given: str, options: tuple[str, ...], what: str, required: bool) -> str | None:
            if given:
                if given not in names:
                    raise UserError(f"{f}: no column '{given}' ({what}; the file has: {', '.join(names)})")
                return given
            found = next((c for c in options if c in names), None)
            if found is None and required:
                raise UserError(f"{f}: no {what} column (looked for {', '.join(options)}; the file has: "
                                f"{', '.join(names)}); set the source's {what}_column")
            return found

        text = pick(self.cfg.text_column, TEXT_COLUMNS, "text", True)
        image = pick(self.cfg.image_column, IMAGE_COLUMNS, "image", False)
        if self.text_col is not None and (text, image) != (self.text_col, self.image_col):
            raise UserError(f"{f}: columns differ from {self.files[0]} (text {text}, image {image})")
        t = schema.field(text).type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            chat = text in ("conversations", "conversation")  # a JSON string of turns
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            chat = True
        else:
            raise UserError(f"{f}: column '{text}' is {t}, not text or a list of conversation turns")
        kind = image_value_kind(schema.field(image).type) if image else ""
        if image and not kind:
            raise UserError(f"{f}: column '{image}' is {schema.field(image).type}, not an image column "
                            f"(struct<bytes, path>, binary, or a list of those)")
        self.text_col, self.image_col, self.chat, self.kind = text, image, chat, kind

    def _init_caches(self) -> None:
        self._pf: dict[int, object] = {}
        self._pid = os.getpid()
        self._texts, self._images = RowGroupCache(16), RowGroupCache(1 << 16, self.IMAGE_CACHE_BYTES)
        self._counts: dict[int, list[int] | None] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_pf", "_texts", "_images", "_counts"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def __len__(self) -> int:
        return int(self.unit_starts[-1])

    def _file(self, f_i: int):
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # forked: own handles and caches
            self._init_caches()
        pf = self._pf.get(f_i)
        if pf is None:
            pf = self._pf[f_i] = pq.ParquetFile(self.files[f_i])
        return pf

    def _where(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample index {i} out of range for {len(self)} samples")
        u = int(np.searchsorted(self.unit_starts, i, side="right")) - 1
        return u, i - int(self.unit_starts[u])

    def key(self, i: int) -> str:
        u, row = self._where(i)
        f_i = self.units[u][0]
        return f"{self.name}/{self.files[f_i].stem}/{i - self.file_first[f_i]}"

    def _column(self, u: int, column: str):
        import pyarrow as pa

        f_i, rg = self.units[u]
        try:
            return self._file(f_i).read_row_group(rg, columns=[column]).column(0)
        except (OSError, pa.ArrowException) as e:
            raise BadSample(f"unreadable row group {rg} ({column}): {e}", self.files[f_i]) from None

    def _image_counts(self, u: int) -> list[int] | None:
        """Images per row of unit ``u``; None: one per row (the footer's statistics say no cell is null)."""
        if u in self._counts:
            return self._counts[u]
        counts = None
        if self.kind in ("struct", "binary"):
            f_i, rg = self.units[u]
            meta = self._file(f_i).metadata.row_group(rg)
            leaf = f"{self.image_col}.bytes" if self.kind == "struct" else self.image_col
            stats = next((meta.column(k).statistics for k in range(meta.num_columns)
                          if meta.column(k).path_in_schema == leaf), None)
            if not (stats is not None and getattr(stats, "has_null_count", True) and stats.null_count == 0):
                counts = [_count_images(v) for v in self._column(u, self.image_col).to_pylist()]
        else:
            counts = [_count_images(v) for v in self._column(u, self.image_col).to_pylist()]
        self._counts[u] = counts
        return counts

    def record(self, i: int) -> dict:
        u, row = self._where(i)
        texts = self._texts.get(u, lambda: self._column(u, self.text_col).to_pylist())
        n = 0
        if self.image_col:
            counts = self._image_counts(u)
            n = 1 if counts is None else counts[row]
        try:
            rec = chat_record(texts[row], n) if self.chat else caption_record(texts[row], n)
        except ValueError as e:
            raise BadSample(str(e), self.files[self.units[u][0]], self.key(i)) from None
        rec["images"] = [str(j) for j in range(n)]
        return rec

    def image(self, i: int, j: int, record: dict) -> torch.Tensor:
        u, row = self._where(i)
        f = self.files[self.units[u][0]]
        col = self._images.get(u, lambda: self._column(u, self.image_col))
        cell = col[row].as_py()
        if isinstance(cell, list):
            cell = [v for v in cell if _count_images(v)][j]
        raw = image_bytes(cell, self.image_root or f.parent, str(f), self.key(i))
        return decode_image(raw, str(f), self.key(i))

    def size_table(self, tokenizer, system_prompt: str, vocab_size: int) -> SizeTable:
        root = str(self.image_root.resolve()) if self.image_root else ""
        key = _tagged_key(tokenizer, system_prompt, self.SIZES_TAG, self.text_col, self.image_col or "", root)
        entries: list = []
        for f_i, f in enumerate(self.files):
            first = self.file_first[f_i]
            n = (self.file_first[f_i + 1] if f_i + 1 < len(self.files) else len(self)) - first
            side, content = Path(f"{f}.sizes.json"), fingerprint(f)
            table = _cached_sizes(side, key, content, n)
            if table is not None:
                part = [reason if (reason := table.reasons.get(k)) is not None else
                        [int(table.text[k]), int(table.labels[k]), int(table.images[k])] for k in range(n)]
            else:
                part = timed_entries(f"{self.name}/{f.name}", n, lambda k, first=first: self.record(first + k),
                                     tokenizer, system_prompt)
                _store_sizes(side, key, content, part)
            entries += part
        return table_from_entries(entries)
