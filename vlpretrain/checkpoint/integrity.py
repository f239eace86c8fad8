"""Checkpoint integrity: per-file checksums in a manifest, a ``.metadata`` reader that runs no code, and the
start-up check that a checkpoint fits on disk.

``manifest.json`` maps every file of a checkpoint to its size and checksum: the CRC-32 of the CRC-32s of its
64 MB pieces, so that pieces hash in parallel threads (zlib: ~3 GB/s per core; enough to catch torn writes and
flipped bits, no defence against a forger, who could rewrite the manifest too: the restricted unpickler below is
that defence). Each rank hashes the shard files it wrote right after writing, while they are still in the page
cache and while they are fsynced (DCP's own fsync is turned off): that hides most of the cost. DCP's
``.metadata`` is a pickle: it is read with an unpickler that admits only the few classes DCP metadata is made of,
after its checksum matched.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import shutil
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from vlpretrain.errors import CheckpointError
from vlpretrain.files import write_json_atomic

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
METADATA = ".metadata"
KEY = "crc32_64m"  # the checksum: CRC-32 of the big-endian CRC-32s of the file's 64 MB pieces
PIECE = 64 << 20  # pieces hash in parallel threads (zlib releases the GIL)
READ = 8 << 20  # streaming reads
CHECKSUMS = True  # False: sizes only (bench/ckpt_checksum.py measures the difference)


def _crc_range(path: Path, start: int, length: int) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        view = memoryview(bytearray(max(1, min(READ, length))))
        while length > 0 and (n := f.readinto(view[:min(length, len(view))])):
            crc = zlib.crc32(view[:n], crc)
            length -= n
    return crc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _checksums(paths: list[Path], sync: bool = False) -> dict[str, str]:
    """{file name: checksum} (``sync``: also fsync each file, while the others hash)."""
    sizes = {p: p.stat().st_size for p in paths}
    jobs = [(p, off, min(PIECE, sizes[p] - off)) for p in paths for off in range(0, max(sizes[p], 1), PIECE)]
    jobs += [(p, -1, 0) for p in paths if sync]

    def run(job: tuple[Path, int, int]) -> int | None:
        p, off, length = job
        return _fsync(p) if off < 0 else _crc_range(p, off, length)
    if len(jobs) <= 1:
        results = list(map(run, jobs))
    else:
        with ThreadPoolExecutor(min(16, len(jobs), 2 * (os.cpu_count() or 1) + 2)) as pool:
            results = list(pool.map(run, jobs))
    pieces: dict[Path, list[int]] = {p: [] for p in paths}
    for (p, off, _), crc in zip(jobs, results):
        if off >= 0:
            pieces[p].append(crc)
    return {p.name: f"{zlib.crc32(b''.join(c.to_bytes(4, 'big') for c in pieces[p])):08x}" for p in paths}


def crc32_file(path: Path) -> str:
    return _checksums([path])[path.name]


def hash_files(paths: list[Path], sync: bool = True) -> dict[str, dict]:
    """{file name: {"size", KEY}} for ``paths``, just written and still in the page cache. ``sync``: also fsync
    them (DCP is asked not to): the checksums are computed while the disk flushes, which hides most of their
    cost."""
    entries = {p.name: {"size": p.stat().st_size} for p in paths}
    if CHECKSUMS:
        for name, crc in _checksums(paths, sync).items():
            entries[name][KEY] = crc
    elif sync:
        list(map(_fsync, paths))
    return entries


def rank_files(step_dir: Path, rank: int) -> list[Path]:
    """The DCP shard files one rank wrote (DCP names them ``__<rank>_<n>.distcp``)."""
    return sorted(step_dir.glob(f"__{rank}_*.distcp"))


def write_manifest(step_dir: Path, files: dict[str, dict]) -> None:
    write_json_atomic(step_dir / MANIFEST, {"version": 1, "files": dict(sorted(files.items()))}, compact=False)


def read_manifest(step_dir: Path) -> dict[str, dict] | None:
    """The manifest's files, or None for a checkpoint written before manifests existed."""
    path = step_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
        return files
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None


_warned_legacy: set[str] = set()


def check_file(step_dir: Path, name: str, entry: dict | None, checksum: bool = True) -> str | None:
    """None if ``name`` matches its manifest entry, else what is wrong (one line)."""
    f = step_dir / name
    if entry is None:
        return None
    if not f.is_file():
        return f"{step_dir}: missing file {name}"
    size = f.stat().st_size
    if size != entry.get("size"):
        what = "is truncated" if isinstance(entry.get("size"), int) and size < entry["size"] else "has another size"
        return f"{step_dir}: {name} {what} ({size} bytes, the manifest says {entry.get('size')})"
    if checksum and CHECKSUMS and KEY in entry and crc32_file(f) != entry[KEY]:
        return f"{step_dir}: {name} is corrupted (checksum mismatch)"
    return None


def check_manifest(step_dir: Path, checksum: bool = True, only: list[str] | None = None) -> str | None:
    """None if every file the manifest names (or those in ``only``) is whole; a one-line problem otherwise. A
    checkpoint without a manifest (older versions) passes with a one-time warning: sizes are checked elsewhere."""
    files = read_manifest(step_dir)
    if files is None:
        if str(step_dir) not in _warned_legacy:
            _warned_legacy.add(str(step_dir))
            msg = f"{step_dir} has no {MANIFEST} (written by an older version): checking file sizes only"
            log.warning(msg)
            print(f"warning: {msg}", flush=True)
        return None
    names = [n for n in files if only is None or n in only]
    problems = [check_file(step_dir, n, files[n], checksum=False) for n in names]  # presence and sizes first
    if any(problems) or not (checksum and CHECKSUMS):
        return next((p for p in problems if p), None)
    names = [n for n in names if KEY in files[n]]
    got = _checksums([step_dir / n for n in names])  # every piece of every file in parallel
    bad = next((n for n in names if got[n] != files[n][KEY]), None)
    return f"{step_dir}: {bad} is corrupted (checksum mismatch)" if bad else None


# ---- DCP metadata without running code


def _allowed(module: str, name: str):
    """The globals DCP metadata pickles are made of (found by unpickling real ones): nothing callable that could
    do harm. Dotted names (attribute chains) are never admitted."""
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    if "." in name:
        return None
    if module == "torch.distributed.checkpoint.metadata" and name in (
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
            "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        return getattr(md, name, None)
    if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
        return fs._StorageInfo
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
        return getattr(torch, name)
    if module == "torch.serialization" and name == "_get_layout":  # a lookup among torch's layouts
        from torch.serialization import _get_layout
        return _get_layout
    if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        import pathlib
        return getattr(pathlib, name)
    if module in ("collections",) and name == "OrderedDict":
        import collections
        return collections.OrderedDict
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = _allowed(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which DCP metadata never holds")
        return obj


def load_metadata_bytes(path: Path):
    """Unpickle a DCP ``.metadata`` file admitting only DCP's metadata classes; CheckpointError otherwise."""
    import io

    from torch.distributed.checkpoint.metadata import Metadata

    try:
        meta = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - whatever is wrong with it, it is not usable metadata
        raise CheckpointError(f"{path}: refusing to load this DCP metadata: {e}") from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (a {type(meta).__name__})")
    return meta


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is checked against the manifest and unpickled without running code."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        step_dir = Path(self.path)
        files = read_manifest(step_dir)
        problem = check_file(step_dir, METADATA, (files or {}).get(METADATA))
        if problem:
            raise CheckpointError(problem)
        meta = load_metadata_bytes(step_dir / METADATA)
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


def read_metadata(step_dir: Path):
    return SafeReader(str(step_dir)).read_metadata()


@contextlib.contextmanager
def single_process_quiet():
    """DCP without a process group warns on every call that it assumes one process: that is our single-process
    path by design (tests, ``ckpt`` tools, one-process runs), so the warning is not shown to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")
        yield


def load_dcp(state: dict, step_dir: str | Path, no_dist: bool | None = None) -> None:
    """Fill ``state`` (templates in this layout) from a DCP checkpoint through ``SafeReader`` (checksums, no
    code run). ``no_dist`` None: without a process group only."""
    no_dist = not dist.is_initialized() if no_dist is None else no_dist
    with single_process_quiet():
        dcp.load(state, storage_reader=SafeReader(str(step_dir)), no_dist=no_dist)


# ---- disk: room at start-up, one line for write failures


def checkpoint_bytes(cfg) -> int:
    """Estimated size of one checkpoint: fp32 weights, two Adam states per trainable parameter, and the full
    weights stored beside the final checkpoint (counted on the meta device: instant)."""
    from vlpretrain.config import trainable_parts
    from vlpretrain.models.vlm import PARTS, build_model, count_parameters

    counts = count_parameters(build_model(cfg.model, "meta"))
    trainable = sum(counts[p] for p in PARTS if p in trainable_parts(cfg))
    return 4 * (counts["total"] * 2 + 2 * trainable)


def check_checkpoint_room(cfg, ckpt_dir: Path, run_dir: Path) -> None:
    """CheckpointError naming the path if the run dir or checkpoint dir is not writable or has no room for one
    checkpoint (the previous one stays until the new one is published, so a full one must fit besides)."""
    need = checkpoint_bytes(cfg)
    for path in dict.fromkeys((Path(run_dir), Path(ckpt_dir))):
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent  # the nearest existing ancestor will hold it
        if not os.access(probe, os.W_OK | os.X_OK):
            raise CheckpointError(f"{path} is not writable (checked {probe})")
        free = shutil.disk_usage(probe).free
        if path == Path(ckpt_dir) and free < need:
            raise CheckpointError(f"not enough room for a checkpoint in {path}: about {need / 1e9:.2f} GB needed, "
                                  f"{free / 1e9:.2f} GB free")


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def describe_write_error(exc: BaseException, path: Path) -> str:
    """One line for a failed checkpoint write: "disk full" / "not writable" with the path when that is the
    cause (torch's zip writer reports a full disk as "unexpected pos": the free space tells)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return f"disk full while writing checkpoint {path} ({e.strerror})"
        if isinstance(e, OSError) and e.errno in _DENIED:
            return f"checkpoint dir not writable: {path} ({e.strerror})"
        stack += [e.__cause__, e.__context__]
        for f in (getattr(e, "failures", None) or {}).values():  # DCP's CheckpointException: (exc, trace)
            stack.append(f[0] if isinstance(f, tuple) else f)
    probe = path if path.exists() else path.parent
    try:
        if shutil.disk_usage(probe).free < (1 << 20):
            return f"disk full while writing checkpoint {path}"
        if not os.access(probe, os.W_OK):
            return f"checkpoint dir not writable: {path}"
    except OSError:
        pass
    return f"writing checkpoint {path} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
