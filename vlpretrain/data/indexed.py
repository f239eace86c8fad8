"""Megatron-LM's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``, "MMIDIDX"): reader and writer.

Corpora tokenized with Megatron's ``tools/preprocess_data.py`` are read as they are, and
:class:`IndexedDatasetWriter` writes files byte-identical to Megatron-core's ``IndexedDatasetBuilder``
for the same input (checked against files written by megatron-core 0.19.2 in
``tests/fixtures/megatron_indexed``).

Layout, all little-endian::

    .idx  9 bytes   magic b"MMIDIDX\\x00\\x00"
          <Q        version, always 1
          <B        token dtype code (see DTYPE_CODES)
          <Q        sequence count S
          <Q        document-index count D (= number of documents + 1)
          int32[S]  sequence lengths, in tokens
          int64[S]  sequence pointers, byte offsets into .bin (exclusive prefix sums of length * itemsize)
          int64[D]  document indices: sequence index boundaries, starting with 0, ending with S;
                    document j holds sequences document_indices[j] : document_indices[j + 1]
          int8[S]   optional: one "mode" per sequence (Megatron's multimodal datasets only)
    .bin  the tokens of all sequences back to back, in the token dtype

Sequences are what Megatron's GPTDataset samples from (``len(dataset)`` = S); documents group them.
Empty input is legal in the format and kept as Megatron keeps it: a zero-length sequence
(Megatron's ``add_item(empty); end_document()``, our ``add_document([])``) and a document with no
sequence at all (Megatron's ``add_document(empty, lengths=[])``, which is what ``preprocess_data.py``
writes for a text that tokenizes to nothing; our ``add_sequences([])``) both round-trip.
"""
from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from vlpretrain.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
# Megatron-core's DType enum: code -> numpy dtype (all little-endian on disk).
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
_INT32_MAX = np.iinfo(np.int32).max

__all__ = [
    "DTYPE_CODES",
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "MAGIC",
    "best_dtype",
    "bin_path",
    "idx_path",
]


class IndexedDatasetError(UserError, ValueError):
    """A .bin/.idx pair that cannot be read (bad magic, unsupported version, sizes that do not match)."""


def idx_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".idx"


def bin_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".bin"


def best_dtype(vocab_size: int | None) -> np.dtype:
    """Megatron's rule (``DType.optimal_dtype``): uint16 when vocab_size < 65500, else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def _token_dtype(dtype) -> np.dtype:
    """Normalise a dtype-like to the little-endian dtype used on disk, rejecting ones the format lacks."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"not a dtype: {dtype!r}") from e
    dt = dt.newbyteorder("<") if dt.itemsize > 1 else dt
    if dt not in _CODE_OF:
        names = ", ".join(d.name for d in DTYPE_CODES.values())
        raise TypeError(f"dtype {np.dtype(dtype).name} is not in the Megatron indexed format (one of: {names})")
    return dt


class IndexedDatasetWriter:
    """Write ``PREFIX.bin`` / ``PREFIX.idx`` the way Megatron-core's ``IndexedDatasetBuilder`` does.

    Tokens go to a temporary ``PREFIX.bin.tmp`` while documents are added; :meth:`finalize` removes
    any old ``PREFIX.idx``, renames the data into ``PREFIX.bin``, then writes ``PREFIX.idx`` through a
    temporary file and ``os.replace``. The .idx is therefore the commit marker: a crash at any point
    leaves either no .idx (an incomplete dataset the reader refuses as missing) or a complete pair.
    Use as a context manager to finalize on success and delete the temporaries on an exception.

    ``dtype`` defaults to Megatron's default, int32; pick with :func:`best_dtype` from the vocab size.
    Token ids are range-checked against ``dtype`` (Megatron would wrap them silently).
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32, multimodal: bool = False):
        self.prefix = os.fspath(prefix)
        self.dtype = _token_dtype(dtype)
        self.multimodal = multimodal
        self._lengths = array("i")  # int32, as stored
        self._doc_indices = array("q", [0])
        self._modes = array("b") if multimodal else None
        self._open_doc = False  # sequences added by add_sequence() since the last end_document()
        self._num_tokens = 0
        self._closed = False
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = bin_path(self.prefix) + ".tmp"
        self._idx_tmp = idx_path(self.prefix) + ".tmp"
        self._bin = open(self._bin_tmp, "wb")

    # ------------------------------------------------------------------ adding data
    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._doc_indices) - 1

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def add_document(self, tokens: Sequence[int] | np.ndarray, mode: int = 0) -> None:
        """One document holding one sequence (``add_item(tokens); end_document()`` in Megatron).

        An empty ``tokens`` gives a zero-length sequence, as Megatron's builder does.
        """
        arr = self._as_tokens(tokens)
        self.add_packed(arr, [arr.size], [1], None if self._modes is None else [mode])

    def add_sequences(
        self, sequences: Iterable[Sequence[int] | np.ndarray], modes: Sequence[int] | None = None
    ) -> None:
        """One document holding several sequences (Megatron's ``add_document(tensor, lengths)``).

        An empty list gives a document with no sequence, which is what Megatron's
        ``preprocess_data.py`` writes for a text that tokenizes to nothing.
        """
        arrays = [self._as_tokens(s) for s in sequences]
        flat = np.concatenate(arrays) if arrays else np.empty(0, self.dtype)
        self.add_packed(flat, [a.size for a in arrays], [len(arrays)], modes)

    def add_sequence(self, tokens: Sequence[int] | np.ndarray, mode: int = 0) -> None:
        """Append a sequence to the current document; close it with :meth:`end_document`."""
        self._check_open()
        arr = self._as_tokens(tokens)
        self._write(arr, np.array([arr.size]), None if self._modes is None else [mode])
        self._open_doc = True

    def end_document(self) -> None:
        """Close the document the :meth:`add_sequence` calls since the last boundary belong to."""
        self._check_open()
        self._doc_indices.append(len(self._lengths))
        self._open_doc = False

    def add_packed(
        self,
        tokens: np.ndarray | Sequence[int],
        sequence_lengths: Sequence[int] | np.ndarray,
        sequences_per_document: Sequence[int] | np.ndarray | None = None,
        modes: Sequence[int] | None = None,
    ) -> None:
        """Bulk append: ``tokens`` (flat) split into ``sequence_lengths``, grouped into documents of
        ``sequences_per_document`` sequences each (default: one document per sequence)."""
        self._check_open()
        if self._open_doc:
            raise RuntimeError("add_sequence() left a document open; call end_document() first")
        arr = self._as_tokens(tokens)
        lengths = np.asarray(sequence_lengths, dtype=np.int64).reshape(-1)
        if lengths.size and lengths.min() < 0:
            raise ValueError("sequence lengths must be >= 0")
        if int(lengths.sum()) != arr.size:
            raise ValueError(f"sequence lengths sum to {int(lengths.sum())} but {arr.size} tokens were given")
        if sequences_per_document is None:
            per_doc = np.ones(lengths.size, dtype=np.int64)
        else:
            per_doc = np.asarray(sequences_per_document, dtype=np.int64).reshape(-1)
            if per_doc.size and per_doc.min() < 0:
                raise ValueError("sequences_per_document must be >= 0")
            if int(per_doc.sum()) != lengths.size:
                raise ValueError(
                    f"sequences_per_document sums to {int(per_doc.sum())} but there are {lengths.size} sequences"
                )
        if modes is not None and len(modes) != lengths.size:
            raise ValueError(f"{len(modes)} modes for {lengths.size} sequences")
        start = len(self._lengths)
        self._write(arr, lengths, modes)
        if per_doc.size:
            self._doc_indices.extend((start + np.cumsum(per_doc)).tolist())

    def _write(self, arr: np.ndarray, lengths: np.ndarray, modes) -> None:
        if lengths.size and lengths.max() > _INT32_MAX:
            raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit the int32 length field")
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.extend(lengths.tolist())
        self._num_tokens += int(arr.size)
        if self._modes is not None:
            self._modes.extend([0] * lengths.size if modes is None else [int(m) for m in modes])

    def _as_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
        if arr.dtype == self.dtype:
            return arr
        if arr.size == 0:
            return np.empty(0, self.dtype)
        if self.dtype.kind in "iu":
            if arr.dtype.kind not in "iub":
                raise TypeError(f"token ids must be integers, got {arr.dtype}")
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"token id {lo if lo < info.min else hi} does not fit dtype {self.dtype.name}")
        return arr.astype(self.dtype)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"writer for {self.prefix} is already finalized or aborted")

    # ------------------------------------------------------------------ finishing
    def finalize(self) -> None:
        """Write ``PREFIX.bin`` and ``PREFIX.idx`` (a document left open by add_sequence() is closed)."""
        self._check_open()
        if self._open_doc:
            self.end_document()
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.empty(0, np.int32)
            pointers = np.zeros(lengths.size, dtype=np.int64)
            if lengths.size > 1:
                np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
            pointers *= self.dtype.itemsize
            with open(self._idx_tmp, "wb") as f:
                f.write(MAGIC)
                f.write(struct.pack("<Q", VERSION))
                f.write(struct.pack("<B", _CODE_OF[self.dtype]))
                f.write(struct.pack("<Q", lengths.size))
                f.write(struct.pack("<Q", len(self._doc_indices)))
                f.write(lengths.astype("<i4", copy=False).tobytes())
                f.write(pointers.astype("<i8", copy=False).tobytes())
                f.write(np.frombuffer(self._doc_indices, dtype=np.int64).astype("<i8", copy=False).tobytes())
                if self._modes is not None:
                    f.write(np.frombuffer(self._modes, dtype=np.int8).tobytes() if len(self._modes) else b"")
                f.flush()
                os.fsync(f.fileno())
            # The .idx is the commit marker: drop the old one before the new .bin lands.
            if os.path.lexists(idx_path(self.prefix)):
                os.unlink(idx_path(self.prefix))
            os.replace(self._bin_tmp, bin_path(self.prefix))
            os.replace(self._idx_tmp, idx_path(self.prefix))
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Close and delete the temporary files; nothing is written under the prefix."""
        self._closed = True
        try:
            self._bin.close()
        finally:
            for path in (self._bin_tmp, self._idx_tmp):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader of a Megatron indexed dataset ``PREFIX.bin`` / ``PREFIX.idx``.

    ``ds[i]`` is sequence i as a read-only numpy array viewing the mapped file (copy it to modify it);
    ``ds[a:b]`` a list of them; ``ds.get(i, offset, length)`` a part of sequence i; ``ds.document(j)``
    all tokens of document j. Opening checks the header and that the .idx and .bin sizes match what
    the header promises (O(1)); :meth:`check` also verifies every pointer and document index (O(n)).
    Pickles by prefix, so it can be handed to DataLoader workers.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self._open()

    def _open(self) -> None:
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        for path, what in ((ipath, "index (.idx)"), (bpath, "data (.bin)")):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset {what} file not found: {path}")
        idx_size = os.path.getsize(ipath)
        with open(ipath, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[: len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(
                f"{ipath}: not a Megatron indexed dataset index (magic {header[:len(MAGIC)]!r}, expected {MAGIC!r})"
            )
        if len(header) < HEADER_SIZE:
            raise IndexedDatasetError(f"{ipath}: truncated header ({idx_size} bytes, need {HEADER_SIZE})")
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != VERSION:
            raise IndexedDatasetError(f"{ipath}: unsupported index version {version} (only {VERSION} is known)")
        code = header[17]
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{ipath}: unknown token dtype code {code}")
        self.dtype: np.dtype = DTYPE_CODES[code]
        n, d = struct.unpack_from("<QQ", header, 18)
        body = HEADER_SIZE + 12 * n + 8 * d
        if idx_size == body:
            has_modes = False
        elif idx_size == body + n and n > 0:
            has_modes = True
        else:
            raise IndexedDatasetError(
                f"{ipath}: size {idx_size} bytes does not match its header ({n} sequences, {d} document indices "
                f"need {body} bytes, or {body + n} with modes)"
            )
        if d < 1:
            raise IndexedDatasetError(f"{ipath}: no document indices (need at least the leading 0)")

        self._idx_mm = np.memmap(ipath, dtype=np.uint8, mode="r")
        self.sequence_lengths: np.ndarray = np.frombuffer(self._idx_mm, "<i4", n, HEADER_SIZE)
        self.sequence_pointers: np.ndarray = np.frombuffer(self._idx_mm, "<i8", n, HEADER_SIZE + 4 * n)
        self.document_indices: np.ndarray = np.frombuffer(self._idx_mm, "<i8", d, HEADER_SIZE + 12 * n)
        self.sequence_modes: np.ndarray | None = (
            np.frombuffer(self._idx_mm, "i1", n, body) if has_modes else None
        )
        if self.document_indices[0] != 0 or not 0 <= self.document_indices[-1] <= n:
            raise IndexedDatasetError(
                f"{ipath}: document indices run {int(self.document_indices[0])}..{int(self.document_indices[-1])}, "
                f"expected 0..{n}"
            )

        bin_size = os.path.getsize(bpath)
        expected = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n else 0
        if bin_size != expected:
            state = "truncated" if bin_size < expected else "longer than its index"
            raise IndexedDatasetError(
                f"{bpath}: {state} ({bin_size} bytes, the index points to {expected} bytes)"
            )
        # numpy cannot map an empty file; an all-empty dataset gets an empty buffer instead.
        self._bin_mm = np.memmap(bpath, dtype=np.uint8, mode="r") if bin_size else np.empty(0, np.uint8)

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        """The number of sequences (what Megatron's GPTDataset samples from)."""
        return self.sequence_lengths.shape[0]

    @property
    def num_documents(self) -> int:
        return self.document_indices.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return self._bin_mm.shape[0] // self.dtype.itemsize

    @staticmethod
    def exists(prefix: str | os.PathLike) -> bool:
        return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))

    # ------------------------------------------------------------------ access
    def _index(self, i) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences")
        return i

    def _read(self, pointer: int, count: int) -> np.ndarray:
        return np.frombuffer(self._bin_mm, dtype=self.dtype, count=count, offset=pointer)

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("slices of an indexed dataset must be contiguous (step 1)")
            return [self[k] for k in range(start, stop)]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"indexed dataset indices must be integers or slices, not {type(i).__name__}")
        i = self._index(i)
        return self._read(int(self.sequence_pointers[i]), int(self.sequence_lengths[i]))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence i (to its end when length is None)."""
        i = self._index(i)
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {i} of {size} tokens")
        return self._read(int(self.sequence_pointers[i]) + offset * self.dtype.itemsize, length)

    def document_sequences(self, j: int) -> range:
        """The sequence indices of document j."""
        nd = self.num_documents
        if j < 0:
            j += nd
        if not 0 <= j < nd:
            raise IndexError(f"document index {j} out of range for {nd} documents")
        return range(int(self.document_indices[j]), int(self.document_indices[j + 1]))

    def document(self, j: int) -> np.ndarray:
        """All tokens of document j, its sequences concatenated (they are contiguous in .bin)."""
        seqs = self.document_sequences(j)
        if not seqs:
            return np.empty(0, self.dtype)
        count = int(self.sequence_lengths[seqs.start : seqs.stop].sum(dtype=np.int64))
        return self._read(int(self.sequence_pointers[seqs.start]), count)

    def check(self) -> None:
        """Full consistency check (O(sequences + documents)): contiguous pointers, ordered document indices."""
        ipath = idx_path(self.prefix)
        lengths = self.sequence_lengths
        if lengths.size and lengths.min() < 0:
            raise IndexedDatasetError(f"{ipath}: negative sequence length")
        expected = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
        expected *= self.dtype.itemsize
        bad = np.flatnonzero(expected != self.sequence_pointers)
        if bad.size:
            k = int(bad[0])
            raise IndexedDatasetError(
                f"{ipath}: sequence {k} points to byte {int(self.sequence_pointers[k])}, expected {int(expected[k])}"
            )
        if np.any(np.diff(self.document_indices) < 0):
            raise IndexedDatasetError(f"{ipath}: document indices are not non-decreasing")

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Drop the mappings (arrays already handed out keep theirs alive)."""
        names = ("sequence_lengths", "sequence_pointers", "document_indices", "sequence_modes", "_idx_mm", "_bin_mm")
        for name in names:
            self.__dict__.pop(name, None)

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}: {len(self)} sequences, {self.num_documents} documents, "
            f"{self.num_tokens} tokens, {self.dtype.name})"
        )
