"""Datasets in the formats users already have, read in place (no conversion), behind the ``Source`` interface.

* ``webdataset``: tar shards as img2dataset writes them (``key.jpg|png|webp`` + ``key.txt`` and/or ``key.json``
  with "caption"; its per-shard ``.parquet`` / ``_stats.json`` are not tars and are never read) and as
  webdataset's ``TarWriter`` / ``ShardWriter`` write them (any image members + ``txt`` / ``json``). A ``json``
  with LLaVA ``conversations`` gives a chat sample. Random access through the same byte-offset index as our
  shards (``shards.ShardReader``: built in memory at the first start, stored next to the shard with the sizes).
* ``llava``: a LLaVA-style JSON list (or JSONL) ``[{"id", "image": "rel/path.jpg", "conversations": [{"from":
  "human"|"gpt", "value": "<image>\\n..."}]}]``; images relative to ``image_root`` (default: the file's folder).
  The file is parsed once at open for the byte span of every item; a sample is one positional read.
* ``parquet``: local Parquet files (the Hugging Face datasets layout), in ``parquet.py``, mapped with the
  record functions here.

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
from pathlib import Path

import numpy as np
import torch

from vlpretrain.config import SourceConfig
from vlpretrain.data.preprocess import decode_image
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


# ----------------------------------------------------------------------------- sizes next to the file (llava, parquet)


def cached_sizes(side: Path, key: str, content: str, n: int) -> SizeTable | None:
    """The sizes stored in ``side`` if they were made with ``key`` from this ``content`` for ``n`` samples."""
    try:
        stored = json.loads(side.read_text(encoding="utf-8"))
        if (stored.get("key"), stored.get("file_hash")) == (key, content) and len(stored["samples"]) == n:
            return table_from_entries(stored["samples"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return None


def store_sizes(side: Path, key: str, content: str, entries: list) -> None:
    """Save the entries in ``side`` (best effort: a read-only data directory keeps what it has)."""
    try_write_json_atomic(side, {"format": "vlpretrain.sizes", "key": key, "file_hash": content, "samples": entries})


def tagged_key(tokenizer, system_prompt: str, *parts: str) -> str:
    """``sizes_key`` plus what this format's mapping depends on (another format or option: other sizes)."""
    text = "\0".join([sizes_key(tokenizer, system_prompt), *parts])
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def timed_entries(name: str, n: int, read_record, tokenizer, system_prompt: str) -> list:
    """The size entries of ``n`` samples (``read_record(k)``), announced with the time they took."""
    t0 = time.perf_counter()
    entries = compute_entries(n, read_record, size_encoder(tokenizer, system_prompt))
    announce(name, n, t0)
    return entries


def content_hash(data: bytes) -> str:
    """blake2b of a whole file's bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


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
        return tagged_key(tokenizer, system_prompt, self.SIZES_TAG)


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

    def where(self, i: int) -> dict:
        return {"file": str(self.path), "item": i}

    def _content_parts(self) -> list:
        return [self.file_hash]

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
        key = tagged_key(tokenizer, system_prompt, self.SIZES_TAG, str(self.image_root.resolve()))
        side = Path(f"{self.path}.sizes.json")
        table = cached_sizes(side, key, self.file_hash, len(self))
        if table is None:
            entries = timed_entries(self.name, len(self), self._checked, tokenizer, system_prompt)
            store_sizes(side, key, self.file_hash, entries)
            table = table_from_entries(entries)
        return table
