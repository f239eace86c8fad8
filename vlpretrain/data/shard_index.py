"""The per-shard index: a byte-offset table of every sample's members, built by a header scan, stored next to
the shard, checked for staleness when it is loaded.

Index: one JSON file next to every shard, ``<shard>.idx.json`` (e.g. ``caption-000000.tar.idx.json``)::

    {"format": "vlpretrain.shard-index", "version": 1,
     "shard": "caption-000000.tar",        # the shard's file name
     "shard_bytes": 1234560,               # its size when indexed
     "shard_hash": "9f0c...",              # blake2b of the size and the first and last 64 KiB
     "complete": true,                     # false: the tar ends early or has a damaged header (see "problem")
     "problem": null,
     "samples": [{"key": "00000001", "members": {"json": [1536, 210], "0.png": [2560, 5012]}}, ...]}

``members`` maps every member suffix (lower case, as webdataset names it) to ``[data offset, size]`` in bytes, so
a sample is read with one positional read per member and no tar scan. A sample whose members cannot all be trusted
(duplicate suffix) carries ``"error"``. ``shards.ShardWriter`` writes the index with the shard; :func:`build_index`
makes one for any tar shard (e.g. written by webdataset's ``TarWriter``); ``shards.ShardReader`` uses an up-to-date
index file when there is one and otherwise indexes the shard in memory (a header scan: it seeks over the data).

Staleness: a rewritten tar usually keeps its byte size (tar pads to 10 KiB records), so size alone proves nothing.
An index is taken as up to date when size and content fingerprint match (two 64 KiB reads per shard at open; no
mtime is stored, so the same input still gives byte-identical index files, and a copy keeps its index). Every
member read also fetches the 512-byte tar header in front of the data (the same read, no extra I/O) and checks
that it names the member with its size: that catches a change the fingerprint misses (in the middle of a big
shard); the shard is then re-indexed once, with a warning, and the read retried. An index without a fingerprint
(written by older versions) is trusted on its size and guarded by that header check.

Errors: :class:`ShardError` for a shard that cannot be indexed at all; ``FileNotFoundError`` naming a missing
shard.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from pathlib import Path

from vlpretrain.errors import UserError
from vlpretrain.files import write_json_atomic

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "vlpretrain.shard-index"
INDEX_VERSION = 1
_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members
_HASH_SPAN = 64 * 1024


class ShardError(UserError, RuntimeError):
    """A shard that cannot be indexed at all (not a tar file, empty, unreadable)."""


def index_path(shard: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(shard)}{INDEX_SUFFIX}")


def _split_member(name: str) -> tuple[str | None, str | None]:
    """(key, suffix) exactly as webdataset's base_plus_ext splits a member name, suffix lower-cased."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def fingerprint(shard: str | os.PathLike, size: int | None = None) -> str:
    """A cheap content hash: blake2b of the size and the first and last 64 KiB (two reads)."""
    size = os.path.getsize(shard) if size is None else size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(shard, "rb") as f:
        h.update(f.read(_HASH_SPAN))
        if size > _HASH_SPAN:
            f.seek(max(_HASH_SPAN, size - _HASH_SPAN))
            h.update(f.read(_HASH_SPAN))
    return h.hexdigest()


def shard_stamp(shard: Path) -> dict:
    """The index fields that tie it to the shard as it is now: its size and fingerprint."""
    size = shard.stat().st_size
    return {"shard_bytes": size, "shard_hash": fingerprint(shard, size)}


def _stale_reason(index: dict, shard: Path) -> str | None:
    """Why ``index`` does not describe ``shard`` as it is now (None: up to date)."""
    st = shard.stat()
    if index.get("shard_bytes") != st.st_size:
        return f"shard is {st.st_size} bytes, index says {index.get('shard_bytes')}"
    if "shard_hash" not in index:
        return None  # older index: trusted on its size, guarded by the header check on every read
    if index["shard_hash"] != fingerprint(shard, st.st_size):
        return "same size, but the content changed since it was indexed"
    return None


def scan_shard(shard: Path) -> dict:
    """Index a tar shard by reading its headers (tarfile seeks over member data)."""
    if not shard.is_file():
        raise FileNotFoundError(f"shard not found: {shard}")
    stamp = shard_stamp(shard)
    size = stamp["shard_bytes"]
    samples: list[dict] = []
    problem = None
    try:
        f = open(shard, "rb")
    except OSError as e:
        raise ShardError(f"cannot open shard {shard}: {e}") from e
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ShardError(f"cannot index {shard}: not a readable tar shard ({e})") from e
        current: dict | None = None
        try:
            while True:
                try:
                    info = tf.next()
                except (tarfile.TarError, EOFError) as e:
                    problem = f"tar stream ends early after {len(samples)} samples: {e}"
                    break
                if info is None:
                    break
                tf.members = []  # keep memory flat on big shards
                if not info.isreg() or _META_RE.match(info.name):
                    continue
                key, suffix = _split_member(info.name)
                if key is None:
                    continue
                if current is None or current["key"] != key:
                    current = {"key": key, "members": {}}
                    samples.append(current)
                if suffix in current["members"]:
                    current["error"] = f"duplicate member .{suffix}"
                    continue
                current["members"][suffix] = [info.offset_data, info.size]
                if info.offset_data + info.size > size and problem is None:
                    problem = f"member {info.name} is truncated (shard cut at byte {size})"
            end = tf.offset
        finally:
            tf.members = []
        if problem is None and end < size:
            # A clean tar ends with zero blocks; anything else after the last header we could read is damage.
            f.seek(end)
            rest = f.read(min(size - end, 1 << 20))
            if rest.strip(b"\0"):
                problem = f"unreadable tar header at byte {end}; the shard is damaged after {len(samples)} samples"
        elif problem is None and end > size:
            problem = f"shard cut at byte {size}"
    if problem is None and size % 512:
        problem = f"size {size} is not a multiple of 512: the shard is truncated"
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": shard.name, **stamp,
            "complete": problem is None, "problem": problem, "samples": samples}


def build_index(shard: str | os.PathLike, write: bool = True) -> dict:
    """Index ``shard`` (any tar in webdataset layout) and, with ``write``, save ``<shard>.idx.json`` next to it."""
    shard = Path(shard)
    index = scan_shard(shard)
    if not index["complete"]:
        log.warning("%s: %s", shard, index["problem"])
    if write:
        write_json_atomic(index_path(shard), index)
    return index


def load_index(shard: str | os.PathLike, build: bool = True, write: bool = False) -> dict:
    """The shard's index file if present and up to date (see the module doc), else (``build``) a fresh scan. A
    stale index file is replaced by the fresh one (best effort: a read-only data directory keeps the old one)."""
    return load_index_or_scan(Path(shard), build, write)[0]


def load_index_or_scan(shard: Path, build: bool, write: bool) -> tuple[dict, bool]:
    """(index, whether it was scanned just now)."""
    if not shard.is_file():
        raise FileNotFoundError(f"shard not found: {shard}")
    ipath = index_path(shard)
    stale = False
    if ipath.is_file():
        try:
            index = json.loads(ipath.read_text(encoding="utf-8"))
            if (isinstance(index, dict) and index.get("format") == INDEX_FORMAT
                    and index.get("version") == INDEX_VERSION and isinstance(index.get("samples"), list)):
                reason = _stale_reason(index, shard)
                if reason is None:
                    return index, False
                log.warning("%s: stale index (%s): re-indexing", shard, reason)
                stale = True
            else:
                log.warning("%s: not a shard index: re-indexing", ipath)
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable index (%s): re-indexing", ipath, e)
    if not build:
        raise ShardError(f"{shard}: no up-to-date index {ipath}")
    index = build_index(shard, write=write)
    if stale and not write:
        try:
            write_json_atomic(ipath, index)
        except OSError:
            pass
    return index, True
