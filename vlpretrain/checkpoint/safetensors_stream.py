"""Write a safetensors file tensor by tensor, never holding the whole state in memory.

``safetensors.torch.save_file`` needs every tensor at once: at 7B that is a full model copy on the writing
rank. The format only needs names, dtypes and shapes up front (the header), so ``StreamingSafetensors`` writes
the header from those, sizes the file, and then writes each tensor's bytes at its offset, in any order and from
any process (``os.pwrite`` on a shared file system): each pipeline rank writes its own parts. The bytes equal
``save_file``'s for the same tensors and metadata (same tensor order, same header), which a test checks.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

# safetensors' dtype names, in the order of its Rust enum (save_file sorts by it, descending, then by name)
_DTYPES = [(torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"), (torch.float8_e5m2, "F8_E5M2"),
           (torch.float8_e4m3fn, "F8_E4M3"), (torch.int16, "I16"), (torch.uint16, "U16"), (torch.float16, "F16"),
           (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.uint32, "U32"), (torch.float32, "F32"),
           (torch.float64, "F64"), (torch.int64, "I64"), (torch.uint64, "U64")]
_NAME = dict(_DTYPES)
_RANK = {dt: i for i, (dt, _) in enumerate(_DTYPES)}


def layout(specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
           metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(header bytes incl. the 8-byte length, {name: (absolute start, end)}) for tensors ``{name: (shape,
    dtype)}``, in save_file's order: larger dtypes first, then by name."""
    order = sorted(specs, key=lambda k: (-_RANK[specs[k][1]], k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    spans, pos = {}, 0
    for name in order:
        shape, dtype = specs[name]
        if dtype not in _NAME:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAME[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        spans[name] = (pos, pos + n)
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 8)  # the data starts 8-byte aligned, as save_file pads it
    head = struct.pack("<Q", len(blob)) + blob
    return head, {k: (len(head) + a, len(head) + b) for k, (a, b) in spans.items()}


class StreamingSafetensors:
    """One safetensors file written piecewise. ``create`` (one process) writes the header and sizes the file;
    ``write`` (any process, any order) puts one tensor's bytes in place, ``write_region`` one shard of it; every
    byte must be written once."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = specs
        self.head, self.spans = layout(specs, metadata)

    @property
    def size(self) -> int:
        return len(self.head) + sum(b - a for a, b in self.spans.values())

    def create(self) -> None:
        with open(self.path, "wb") as f:
            f.write(self.head)
            f.truncate(self.size)

    def write(self, name: str, tensor: torch.Tensor, fd: int | None = None) -> None:
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, header says {shape} {dtype}")
        data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1)  # little-endian hosts
        start, _ = self.spans[name]
        own = fd is None
        fd = os.open(self.path, os.O_WRONLY) if own else fd
        try:
            _pwrite_all(fd, memoryview(data), start)
        finally:
            if own:
                os.close(fd)

    def write_region(self, name: str, local: torch.Tensor, region: tuple[slice, ...], fd: int) -> None:
        """Put ``local`` = full[region] in place (a rank's shard): one write when the region is one run of
        bytes, else one per row of a 2-D column slice (TP row-parallel weights)."""
        shape, dtype = self.specs[name]
        if local.dtype != dtype or tuple(local.shape) != tuple(s.stop - s.start for s in region):
            raise ValueError(f"{name}: shard {tuple(local.shape)} {local.dtype} does not fit {region} of {shape}")
        data = local.detach().cpu().contiguous().view(torch.uint8).numpy()
        item = torch.empty((), dtype=dtype).element_size()
        start, _ = self.spans[name]
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        partial = [i for i, s in enumerate(region) if (s.start, s.stop) != (0, shape[i])]
        # one block when every dim after the last partial one is whole and every dim before it has length 1
        if not partial or all(region[i].stop - region[i].start == 1 for i in range(partial[-1])):
            offset = sum(s.start * st for s, st in zip(region, strides)) * item
            _pwrite_all(fd, memoryview(data.reshape(-1)), start + offset)
        elif len(shape) == 2:
            rows, cols = region
            for i, row in enumerate(data.reshape(rows.stop - rows.start, -1)):
                _pwrite_all(fd, memoryview(row), start + ((rows.start + i) * shape[1] + cols.start) * item)
        else:
            raise ValueError(f"{name}: cannot write a {len(shape)}-d shard sliced on several dims piecewise")

    def open(self) -> int:
        """A file descriptor for many ``write(..., fd=)`` calls; close it with ``os.close`` (after fsync)."""
        return os.open(self.path, os.O_WRONLY)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def save_streaming(path: str | Path, tensors, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                   metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (an iterable of (name, tensor), produced one at a time) to ``path`` through a
    ``.tmp`` file renamed when complete: a crash never leaves a half-written file under the final name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    out = StreamingSafetensors(tmp, specs, metadata)
    out.create()
    fd, seen = out.open(), set()
    try:
        for name, t in tensors:
            out.write(name, t, fd)
            seen.add(name)
        os.fsync(fd)
    finally:
        os.close(fd)
    if seen != set(specs):
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{path}: {len(set(specs) - seen)} tensors were never written, "
                         f"e.g. {sorted(set(specs) - seen)[:3]}")
    os.replace(tmp, path)
