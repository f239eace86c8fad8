"""Multimodal samples in webdataset tar shards: :class:`ShardWriter` writes them, :class:`ShardReader` reads any
sample by its byte offsets (the per-shard index: ``shard_index.py``).

Layout of one sample ``<key>`` inside a shard (webdataset groups consecutive members by the name up to the first
dot, so keys never contain dots or slashes)::

    <key>.json      UTF-8 JSON: "text" (with <image_placeholder> marks) or "conversation"
                    ([{"role": "User"|"Assistant", "content": ...}]), "category", "source", any extra fields, and
                    "images": the image member suffixes in placeholder order, e.g. ["0.png", "1.jpg"]
    <key>.0.png     the image files, raw bytes as given (never re-encoded)
    <key>.1.jpg

Index: ``<shard>.idx.json`` next to every shard, mapping every member to its byte offset and size (format and
staleness checks: ``shard_index.py``). :class:`ShardWriter` writes the index with the shard; :class:`ShardReader`
uses an up-to-date index file when there is one and otherwise indexes the shard in memory (a header scan: it
seeks over the data). Every member read also fetches the 512-byte tar header in front of the data (the same read,
no extra I/O) and checks that it names the member with its size: that catches a change the index's fingerprint
misses (in the middle of a big shard); the shard is then re-indexed once, with a warning, and the read retried.

Errors: :class:`BadSample` (a ``ValueError``, with ``shard`` and ``key``) for one unreadable sample (truncated
member, corrupt JSON, missing image member, undecodable image), so callers can skip and count;
``shard_index.ShardError`` for a shard that cannot be indexed at all; ``FileNotFoundError`` naming a missing shard.
"""
from __future__ import annotations

import bisect
import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from vlpretrain.data.shard_index import (
    INDEX_FORMAT,
    INDEX_VERSION,
    index_path,
    load_index_or_scan,
    scan_shard,
    shard_stamp,
)
from vlpretrain.data.special_tokens import IMAGE_PLACEHOLDER
from vlpretrain.files import write_json_atomic

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm")
DEFAULT_MAX_BYTES = 1 << 30
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_MTIME = 946684800  # fixed member mtime (2000-01-01): same input, byte-identical shards
_BLOCK = tarfile.BLOCKSIZE  # a member's (last) header is the 512-byte block right before its data


class BadSample(ValueError):
    """One sample cannot be read or decoded; the rest of the shard is fine."""

    def __init__(self, message: str, shard: str | os.PathLike | None = None, key: str | None = None):
        self.shard = str(shard) if shard is not None else None
        self.key = key
        self.reason = message
        where = f"{self.shard}: " if self.shard else ""
        where += f"sample {key!r}: " if key is not None else ""
        super().__init__(where + message)


class _StaleIndex(Exception):
    """The tar header at a recorded offset does not name the member the index expects."""


# ----------------------------------------------------------------------------- helpers


def _sniff_ext(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "bin"


def count_placeholders(record: dict) -> int:
    if "conversation" in record:
        return sum(str(t.get("content", "")).count(IMAGE_PLACEHOLDER) for t in record["conversation"] or [])
    return str(record.get("text") or "").count(IMAGE_PLACEHOLDER)


def expand_shards(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Shard paths from a path, a list, directories (their ``*.tar``, sorted), globs and ``{000..009}`` braces."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for item in paths:
        text = os.fspath(item)
        patterns = [text]
        if "{" in text:
            try:
                from braceexpand import braceexpand

                patterns = list(braceexpand(text))
            except ImportError:
                pass
        for pattern in patterns:
            p = Path(pattern)
            if p.is_dir():
                found = sorted(p.glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"no *.tar shard in directory {p}")
                out.extend(found)
            elif any(c in pattern for c in "*?[") and not p.exists():
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise FileNotFoundError(f"no shard matches {pattern}")
                out.extend(Path(m) for m in matches)
            else:
                out.append(p)
    return out


# ----------------------------------------------------------------------------- writer


class ShardWriter:
    """Write samples into ``out_dir/prefix-000000.tar``, ``prefix-000001.tar``, ... plus one index per shard.

    A shard is written under a hidden temporary name and renamed once complete, then its index is written; a crash
    leaves at most a ``.*.tmp`` file, never a half shard under a final name. A new shard starts when the current one
    holds ``max_samples_per_shard`` samples or the next sample would take it past ``max_bytes`` (a single bigger
    sample gets a shard of its own). Output is byte-identical for the same input (fixed tar metadata).

    ``overwrite``: shards named ``prefix-NNNNNN.tar`` already in ``out_dir`` raise ``FileExistsError`` unless set;
    when set, those beyond the ones this writer produced are deleted on ``close()`` (with their indexes).
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, max_samples_per_shard: int = 1000,
                 max_bytes: int = DEFAULT_MAX_BYTES, source: str | None = None, validate: bool = True,
                 overwrite: bool = False):
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"shard prefix must be a plain name without dots, got {prefix!r}")
        if max_samples_per_shard < 1 or max_bytes < 1:
            raise ValueError("max_samples_per_shard and max_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples_per_shard
        self.max_bytes = max_bytes
        self.source = source if source is not None else prefix
        self.validate = validate
        self.overwrite = overwrite
        existing = self._existing()
        if existing and not overwrite:
            raise FileExistsError(f"{self.out_dir} already has shards {prefix}-*.tar ({existing[0].name}, ...); "
                                  "pass overwrite=True (--overwrite) to replace them")
        self.shards: list[Path] = []
        self.samples_written = 0
        self.bytes_written = 0
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp: Path | None = None
        self._count = 0
        self._index: list[dict] = []
        self._closed = False

    def _existing(self) -> list[Path]:
        pattern = re.compile(re.escape(self.prefix) + r"-\d{6}\.tar$")
        return sorted(p for p in self.out_dir.glob(f"{self.prefix}-*.tar") if pattern.match(p.name))

    def _shard_name(self, n: int) -> Path:
        return self.out_dir / f"{self.prefix}-{n:06d}.tar"

    def _open(self) -> None:
        final = self._shard_name(len(self.shards))
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0
        self._index = []

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None and self._tmp is not None
        self._tar.close()  # end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._shard_name(len(self.shards))
        os.replace(self._tmp, final)
        index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": final.name, **shard_stamp(final),
                 "complete": True, "problem": None, "samples": self._index}
        write_json_atomic(index_path(final), index)
        self.bytes_written += index["shard_bytes"]
        self.shards.append(final)
        self._tar = self._file = self._tmp = None

    def _add(self, name: str, data: bytes) -> list[int]:
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = _MTIME
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        padded = (len(data) + 511) // 512 * 512
        return [self._tar.offset - padded, len(data)]

    def write(self, key: str, record: dict, images: Sequence[bytes | str | os.PathLike] = ()) -> None:
        """Add one sample. ``record`` holds "text" or "conversation", "category" and optionally "source" and extra
        fields; its "images" entry (if any) is replaced by the member suffixes. ``images`` are raw bytes (format
        sniffed) or file paths (extension from the name), in placeholder order; all are read before anything is
        written, so a missing file raises ``FileNotFoundError`` and leaves the shard untouched. A failure while
        writing (e.g. disk full) drops the open shard's temporary file and closes the writer."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"sample key must be non-empty [A-Za-z0-9_-]+ (no dots or slashes), got {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if not isinstance(record, dict):
            raise TypeError("record must be a dict")
        record = dict(record)
        if self.validate:
            if "conversation" not in record and not isinstance(record.get("text"), str):
                raise ValueError(f"sample {key!r}: record needs 'text' or 'conversation'")
            if not record.get("category"):
                raise ValueError(f"sample {key!r}: record needs a 'category'")
            n = count_placeholders(record)
            if n != len(images):
                raise ValueError(f"sample {key!r}: {n} image placeholders but {len(images)} images")
        record.setdefault("source", self.source)
        blobs: list[tuple[str, bytes]] = []
        for i, image in enumerate(images):
            if isinstance(image, (bytes, bytearray, memoryview)):
                data = bytes(image)
                ext = _sniff_ext(data)
            else:
                path = Path(image)
                data = path.read_bytes()
                ext = path.suffix.lower().lstrip(".") or _sniff_ext(data)
                if "." in ext or "/" in ext:
                    ext = _sniff_ext(data)
            blobs.append((f"{i}.{ext}", data))
        record["images"] = [name for name, _ in blobs]
        payload = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        size = len(payload) + sum(len(d) for _, d in blobs) + 1024 * (1 + len(blobs))
        try:  # from here on a failure (disk full, ...) would leave a half sample: drop the open shard and stop
            if self._tar is not None and (self._count >= self.max_samples
                                          or self._tar.offset + size > self.max_bytes):
                self._finish()
            if self._tar is None:
                self._open()
            members = {"json": self._add(f"{key}.json", payload)}
            for name, data in blobs:
                members[name] = self._add(f"{key}.{name}", data)
        except BaseException:
            self.abort()
            raise
        self._index.append({"key": key, "members": members})
        self._keys.add(key)
        self._count += 1
        self.samples_written += 1

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> list[Path]:
        """Finish the open shard; returns every shard path written (in order)."""
        if not self._closed:
            if self._tar is not None:
                self._finish()
            self._closed = True
            if self.overwrite:
                keep = set(self.shards)
                for stale in self._existing():
                    if stale not in keep:
                        stale.unlink()
                        index_path(stale).unlink(missing_ok=True)
        return list(self.shards)

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self._tmp is not None:
            try:
                if self._file is not None:
                    self._file.close()
            finally:
                self._tmp.unlink(missing_ok=True)
                self._tar = self._file = self._tmp = None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------- reader


class ShardReader:
    """Random access to the samples of one or more shards (in the order given, samples in tar order).

    ``paths``: shard paths, directories (their ``*.tar``), globs or brace patterns. Every shard must exist
    (``FileNotFoundError`` naming it); a shard without an up-to-date index is indexed in memory (``write_index``
    saves that index next to it). Reads use ``os.pread`` on file descriptors opened per process, so one reader can
    be shared by DataLoader workers (forked or pickled).

    A shard found changed while reading (its tar header check fails) is re-indexed in place; sample numbers keep
    the counts the reader opened with (the sampler is sized by them): a sample the new index lacks is a
    :class:`BadSample`, and samples beyond the old count wait for the next start.
    """

    def __init__(self, paths: str | os.PathLike | Iterable[str | os.PathLike], write_index: bool = False,
                 max_open_files: int = 64):
        self.paths = expand_shards(paths)
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"shard not found: {p}")
        self.indexes: list[dict] = []
        self._scanned: dict[int, tuple] = {}  # shard -> the file's identity when this process indexed it
        for s, p in enumerate(self.paths):
            identity = self._identity(p)
            index, scanned = load_index_or_scan(p, build=True, write=write_index)
            self.indexes.append(index)
            if scanned:
                self._scanned[s] = identity
        self._reindexed: set[int] = set()
        self._starts = [0]
        for index in self.indexes:
            self._starts.append(self._starts[-1] + len(index["samples"]))
        self.max_open_files = max_open_files
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    # pickling (spawned DataLoader workers): drop the open descriptors
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def keys(self) -> list[str]:
        return [s["key"] for index in self.indexes for s in index["samples"]]

    @property
    def problems(self) -> dict[str, str]:
        """Shards whose tar is damaged or truncated: {path: what is wrong}."""
        return {str(p): ix["problem"] for p, ix in zip(self.paths, self.indexes) if not ix.get("complete", True)}

    def _locate(self, i: int) -> tuple[int, dict]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        s = bisect.bisect_right(self._starts, i) - 1
        samples, j = self.indexes[s]["samples"], i - self._starts[s]
        if j >= len(samples):  # the shard was rewritten with fewer samples during this run
            raise BadSample(f"sample {j} is gone: the shard changed and now holds {len(samples)} samples",
                            self.paths[s])
        return s, samples[j]

    def locate(self, i: int) -> tuple[Path, str]:
        """(shard path, key) of sample ``i``."""
        s, entry = self._locate(i)
        return self.paths[s], entry["key"]

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # forked: never share descriptors (or their offsets) with the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            if len(self._fds) >= self.max_open_files:
                old = next(iter(self._fds))
                os.close(self._fds.pop(old))
            fd = os.open(self.paths[s], os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._fds[s] = fd
        return fd

    def _read(self, fd: int, offset: int, size: int) -> bytes:
        if hasattr(os, "pread"):
            chunks, done = [], 0
            while done < size:
                chunk = os.pread(fd, size - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
            return b"".join(chunks)
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)

    def read_member(self, i: int, suffix: str) -> bytes:
        """Raw bytes of one member (e.g. "json", "0.png") of sample ``i``."""
        return self._fresh(i, lambda s, entry: self._member(s, entry, suffix))

    def _fresh(self, i: int, read):
        """``read(shard, entry)`` for sample ``i``; a stale index is rebuilt once and the read retried."""
        s, entry = self._locate(i)
        try:
            return read(s, entry)
        except _StaleIndex:
            self._reindex(s)
        s, entry = self._locate(i)
        try:
            return read(s, entry)
        except _StaleIndex:
            raise BadSample("the shard keeps changing while it is read", self.paths[s], entry["key"]) from None

    @staticmethod
    def _identity(path: Path) -> tuple:
        st = os.stat(path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _reindex(self, s: int) -> None:
        path = self.paths[s]
        old = len(self.indexes[s]["samples"])
        if s not in self._reindexed:
            self._reindexed.add(s)
            log.warning("%s: the shard changed since it was indexed (a tar header does not match its index): "
                        "re-indexing", path)
        identity = self._identity(path)
        index = scan_shard(path)
        fd = self._fds.pop(s, None)
        if fd is not None and self._pid == os.getpid():
            os.close(fd)  # a replaced file: read the new one
        self.indexes[s], self._scanned[s] = index, identity
        new = len(index["samples"])
        if new != old:
            log.warning("%s: now holds %d samples instead of %d; this run keeps using %d sample slots",
                        path, new, old, old)

    def _header_ok(self, s: int, header: bytes, name: str, size: int) -> bool:
        """Does the tar header in front of the data name member ``name`` of ``size`` bytes?"""
        field = header[:100].split(b"\0", 1)[0]
        if field.lower() == name.lower().encode() and not header[345:346].strip(b"\0"):  # fast path: no prefix
            try:
                if int(header[124:136].strip(b"\0 ") or b"0", 8) == size:
                    return True
            except ValueError:
                pass
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            got = info.name.lower()
        except (tarfile.HeaderError, ValueError):
            got, info = None, None
        if info is not None and info.size == size:
            want = name.lower()
            if got == want or (len(got) >= 99 and want.startswith(got)):  # ustar/GNU cut long names at 100
                return True
            if want.encode("ascii", "replace").decode()[:100] == got[:100]:  # PAX keeps non-ASCII names apart
                return True
        # An index this process built from the file as it is now is right by construction (an unusual header,
        # e.g. a member too big for the ustar size field); otherwise the shard changed under its index.
        try:
            return self._scanned.get(s) == self._identity(self.paths[s])
        except OSError:
            return False

    def _member(self, s: int, entry: dict, suffix: str) -> bytes:
        path, key = self.paths[s], entry["key"]
        if suffix not in entry["members"]:
            raise BadSample(f"no member .{suffix}", path, key)
        offset, size = entry["members"][suffix][:2]
        # the member's header and data in one read: checking the header costs no extra I/O
        raw = self._read(self._fd(s), offset - _BLOCK, size + _BLOCK)
        if len(raw) < _BLOCK or not self._header_ok(s, raw[:_BLOCK], f"{key}.{suffix}", size):
            if len(raw) < _BLOCK and self._scanned.get(s) == self._identity(path):
                raise BadSample(f"member .{suffix} is truncated (0 of {size} bytes)", path, key)
            raise _StaleIndex(s)
        data = raw[_BLOCK:]
        if len(data) != size:
            raise BadSample(f"member .{suffix} is truncated ({len(data)} of {size} bytes)", path, key)
        return data

    def read(self, i: int) -> dict:
        """The sample's JSON record with "images" replaced by the raw image bytes (placeholder order), plus
        "image_names" (the member suffixes, e.g. ["0.png"]: what SampleEncoder.encode needs as "images"),
        "__key__" and "__shard__". Raises :class:`BadSample` for a damaged sample (truncated member, corrupt JSON,
        missing member). Images are not decoded: see ``preprocess.decode_image``."""
        return self._fresh(i, self._read_sample)

    def _read_sample(self, s: int, entry: dict) -> dict:
        path, key = self.paths[s], entry["key"]
        if entry.get("error"):
            raise BadSample(entry["error"], path, key)
        raw = self._member(s, entry, "json")
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadSample(f"corrupt JSON member: {e}", path, key) from None
        if not isinstance(record, dict):
            raise BadSample("JSON member is not an object", path, key)
        names = record.get("images")
        if names is None:  # a shard made elsewhere: take its image members in name order
            names = sorted((m for m in entry["members"] if m.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS),
                           key=lambda m: (len(m.split(".")[0]), m))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadSample("'images' must be a list of member names", path, key)
        record["images"] = [self._member(s, entry, n.lower()) for n in names]
        record["image_names"] = list(names)
        record["__key__"] = key
        record["__shard__"] = str(path)
        return record

    def __getitem__(self, i: int) -> dict:
        return self.read(i)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self.read(i)
