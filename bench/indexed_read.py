"""Megatron .bin/.idx corpora: our reader/writer (vlpretrain/data/indexed.py) vs megatron-core's
``IndexedDataset`` / ``IndexedDatasetBuilder``, side by side on the same files.

    python bench/indexed_read.py [--documents 200000] [--mean-tokens 300] [--reads 100000] [--chunk 4096]
                                 [--repeats 5] [--dir /tmp/vlp_indexed_bench]

Needs megatron-core (``pip install 'megatron-core>=0.16,<0.17'`` on Python 3.10/3.11). Writes a synthetic
corpus (``--documents`` documents of geometric lengths around ``--mean-tokens``, int32 token ids below
DeepSeek-LLM's vocab of 102400, 1% empty) once with each writer, checks that both writers produce the same
bytes, then times, on the files our writer wrote, the access patterns the training and evaluation paths use:

- ``random_chunk``: what ``IndexedSource.tokens`` does for the sampler: a random chunk of at most
  ``--chunk`` tokens (a whole document when it is shorter), ``ds.get(seq, offset, n)`` -> an int64 copy;
- ``random_doc``: a random whole document, ``ds[i]`` -> an int64 copy;
- ``sequential``: every document in order, ``ds[i]`` -> an int64 copy (the eval text path).

Three readers: ``ours`` (vlpretrain's ``IndexedDataset``), ``megatron`` (megatron-core's ``IndexedDataset``
called directly) and ``ours+mcore`` (``OursOverMegatron`` below: our checks, megatron-core's reads: what the
training path would run if it read through megatron-core).

The same index lists go to every reader; each repeat runs them back to back, each going first in turn; the
median over repeats gives documents/s. Also timed: writing (documents/s, our ``add_document`` and
``add_packed`` vs megatron's ``add_item`` + ``end_document``), opening a dataset, and importing each module in
a fresh interpreter. The files are hot in the page cache (both readers map the same
files), so the figures compare per-read overhead, not disk speed. Run it alone (it is timing).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlpretrain.data.indexed import IndexedDataset, IndexedDatasetWriter  # noqa: E402

VOCAB = 102400


def _megatron():
    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed" from megatron.core's init
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset as mi
    return mi


def make_docs(n: int, mean: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.geometric(1.0 / mean, size=n).astype(np.int64)
    lengths[rng.random(n) < 0.01] = 0
    tokens = rng.integers(0, VOCAB, size=int(lengths.sum()), dtype=np.int32)
    return tokens, lengths


class OursOverMegatron(IndexedDataset):
    """Our reader with its token reads delegated to megatron-core's ``IndexedDataset.get``: what switching the
    training path to megatron-core costs while keeping our checks (one-line errors at open; index and offset
    bounds, which megatron-core's ``get`` does not check: it reads on into the next sequence)."""

    def _open(self) -> None:
        super()._open()
        self._mcore = _megatron().IndexedDataset(self.prefix, multimodal=self.sequence_modes is not None)
        # megatron-core 0.16's _MMapBinReader.__del__ closes the mmap under arrays it handed out (reading one
        # after the dataset is gone segfaults); skipping that close lets the mapping live as numpy's does.
        self._mcore.bin_reader._bin_buffer_mmap = None

    def _get(self, i: int, offset: int, length: int) -> np.ndarray:
        out = self._mcore.get(i, offset, length)
        return out[0] if isinstance(out, tuple) else out

    def __getitem__(self, i):
        i = self._index(i)
        return self._get(i, 0, int(self.sequence_lengths[i]))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        i = self._index(i)
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {i} of {size} tokens")
        return self._get(i, offset, length)


def write_ours(prefix: Path, tokens, lengths) -> None:
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            w.add_document(tokens[a:b])


def write_ours_packed(prefix: Path, tokens, lengths) -> None:
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_packed(tokens, lengths)


def write_megatron(prefix: Path, tokens, lengths) -> None:
    import torch

    mi = _megatron()
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    b = mi.IndexedDatasetBuilder(mi.get_bin_path(str(prefix)), dtype=np.int32)
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        b.add_item(torch.from_numpy(tokens[lo:hi]))
        b.end_document()
    b.finalize(mi.get_idx_path(str(prefix)))


def same_files(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(f"{a}.{ext}", f"{b}.{ext}", shallow=False) for ext in ("bin", "idx"))


def read_chunks(ds, seqs: list, offs: list, counts: list) -> int:
    total = 0
    for s, o, n in zip(seqs, offs, counts):
        total += int(np.asarray(ds.get(s, o, n), dtype=np.int64).sum())
    return total


def read_items(ds, order: list) -> int:
    total = 0
    for i in order:
        total += int(np.asarray(ds[i], dtype=np.int64).sum())
    return total


def import_seconds(module: str, repeats: int, after: str = "numpy") -> float:
    """Seconds to import ``module`` in a fresh interpreter that has already imported ``after``."""
    code = (f"import time, warnings; warnings.simplefilter('ignore'); import {after}; t = time.perf_counter(); "
            f"import {module}; print(time.perf_counter() - t)")
    root = Path(__file__).resolve().parents[1]
    out = [float(subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                                check=True).stdout.split()[-1]) for _ in range(repeats)]
    return statistics.median(out)


def bench_writes(args, root: Path, tokens: np.ndarray, lengths: np.ndarray) -> tuple[bool, dict[str, float]]:
    """Documents/s of each writer (interleaved repeats, median) and whether all wrote the same bytes."""
    writers = {"ours add_document": write_ours, "ours add_packed": write_ours_packed,
               "megatron add_item+end_document": write_megatron}
    wtimes: dict[str, list[float]] = {k: [] for k in writers}
    identical = True
    for r in range(max(3, args.repeats // 2)):
        names = list(writers) if r % 2 == 0 else list(reversed(writers))
        for name in names:
            prefix = root / name.split()[0] / f"w{list(writers).index(name)}"
            prefix.parent.mkdir(exist_ok=True)
            t = time.perf_counter()
            writers[name](prefix, tokens, lengths)
            wtimes[name].append(time.perf_counter() - t)
        identical &= same_files(root / "ours" / "w0", root / "megatron" / "w2")
        identical &= same_files(root / "ours" / "w1", root / "megatron" / "w2")
    print(f"writers byte-identical (.bin and .idx, ours add_document and add_packed vs megatron's): {identical}")
    write_rate = {k: args.documents / statistics.median(v) for k, v in wtimes.items()}
    for k, v in write_rate.items():
        print(f"  write {k:32s} {v:12,.0f} documents/s")
    return identical, write_rate


def open_readers(args, prefix: str, mi) -> tuple[dict, dict[str, float]]:
    """The three readers of one corpus, and each one's median open time."""
    opening = {"ours": lambda: IndexedDataset(prefix),
               "ours+mcore": lambda: OursOverMegatron(prefix),
               "megatron": lambda: mi.IndexedDataset(prefix)}
    opens: dict[str, list[float]] = {k: [] for k in opening}
    for _ in range(args.repeats):
        for name, fn in opening.items():
            t = time.perf_counter()
            fn()
            opens[name].append(time.perf_counter() - t)
    return {k: fn() for k, fn in opening.items()}, {k: statistics.median(v) for k, v in opens.items()}


def read_patterns(args, ours) -> dict:
    """random_chunk (IndexedSource's chunking: sequence s of n tokens gives ceil(n / chunk) chunks),
    random_doc and sequential reads: pattern -> (function of a reader, documents read)."""
    rng = np.random.default_rng(1)
    n_seq = len(ours)
    seq_lengths = ours.sequence_lengths.astype(np.int64)
    per_seq = (seq_lengths + args.chunk - 1) // args.chunk
    seq_of_chunk = np.repeat(np.arange(n_seq), per_seq)
    first = np.concatenate([[0], np.cumsum(per_seq)[:-1]])
    off_of_chunk = (np.arange(seq_of_chunk.size) - np.repeat(first, per_seq)) * args.chunk
    pick = rng.integers(0, seq_of_chunk.size, args.reads)
    c_seq = seq_of_chunk[pick]
    c_off = off_of_chunk[pick]
    c_len = np.minimum(args.chunk, seq_lengths[c_seq] - c_off)
    chunk_args = (c_seq.tolist(), c_off.tolist(), c_len.tolist())
    random_docs = rng.integers(0, n_seq, args.reads).tolist()
    sequential = list(range(n_seq))
    return {
        "random_chunk": (lambda ds: read_chunks(ds, *chunk_args), args.reads),
        "random_doc": (lambda ds: read_items(ds, random_docs), args.reads),
        "sequential": (lambda ds: read_items(ds, sequential), n_seq),
    }


def bench_reads(args, readers: dict, patterns: dict) -> dict[str, dict[str, float]]:
    """Documents/s per pattern and reader: each reader goes first in turn, medians; all must read the same."""
    rates: dict[str, dict[str, float]] = {}
    for pname, (fn, count) in patterns.items():
        times: dict[str, list[float]] = {k: [] for k in readers}
        sums = set()
        for r in range(args.repeats):
            names = list(readers)
            for name in names[r % 3:] + names[:r % 3]:
                t = time.perf_counter()
                sums.add(fn(readers[name]))
                times[name].append(time.perf_counter() - t)
        assert len(sums) == 1, f"{pname}: the readers returned different tokens"
        rates[pname] = {k: count / statistics.median(v) for k, v in times.items()}
        spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()}
        o, m, w = (rates[pname][k] for k in ("ours", "megatron", "ours+mcore"))
        print(f"  read {pname:13s} ours {o:10,.0f}  megatron-core {m:10,.0f}  ours+mcore {w:10,.0f} docs/s   "
              f"megatron/ours {m / o:.3f}  ours+mcore/ours {w / o:.3f}   (spread "
              + ", ".join(f"{k} {v:.0%}" for k, v in spread.items()) + ")")
    return rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--documents", type=int, default=200_000)
    ap.add_argument("--mean-tokens", type=int, default=300)
    ap.add_argument("--reads", type=int, default=100_000, help="random reads per pattern and repeat")
    ap.add_argument("--chunk", type=int, default=4096, help="sample length for random_chunk (train.seq_len)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/vlp_indexed_bench")
    args = ap.parse_args(argv)

    mi = _megatron()
    import megatron.core

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    tokens, lengths = make_docs(args.documents, args.mean_tokens)
    print(f"corpus: {args.documents} documents, {tokens.size} tokens ({tokens.nbytes / 2**20:.0f} MiB int32), "
          f"megatron-core {megatron.core.__version__}, numpy {np.__version__}")
    identical, write_rate = bench_writes(args, root, tokens, lengths)
    readers, open_s = open_readers(args, str(root / "ours" / "w0"), mi)
    rates = bench_reads(args, readers, read_patterns(args, readers["ours"]))

    imports = {"ours": import_seconds("vlpretrain.data.indexed", 3),
               "megatron": import_seconds("megatron.core.datasets.indexed_dataset", 3, after="torch")}
    print("  open   " + "   ".join(f"{k} {v * 1e3:.2f} ms" for k, v in open_s.items()))
    print(f"  import ours {imports['ours']:.3f} s   megatron-core {imports['megatron']:.2f} s "
          "(fresh interpreter, numpy / torch already imported)")
    slowest = min(rates[p][k] / rates[p]["ours"] for p in ("random_chunk", "random_doc")
                  for k in ("megatron", "ours+mcore"))
    print(json.dumps({"bench": "indexed_read", "documents": args.documents, "tokens": int(tokens.size),
                      "repeats": args.repeats, "byte_identical": identical,
                      "write_docs_per_s": {k: round(v) for k, v in write_rate.items()},
                      "read_docs_per_s": {p: {k: round(v) for k, v in d.items()} for p, d in rates.items()},
                      "open_ms": {k: round(v * 1e3, 3) for k, v in open_s.items()},
                      "import_s": {k: round(v, 3) for k, v in imports.items()},
                      "worst_random_ratio_vs_ours": round(slowest, 3)}))
    shutil.rmtree(root, ignore_errors=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
