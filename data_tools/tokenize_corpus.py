"""Tokenize JSONL text into a Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

    python -m data_tools tokenize --input a.jsonl [b.jsonl ...] --tokenizer tokenizer.json \\
        --output-prefix out/corpus [--json-key text] [--workers 4] [--append-eos]

Each line is a JSON object; its ``--json-key`` value (a string, or a list of strings read as the
sentences of one document, as Megatron's preprocess_data.py does) becomes one document. Lines are
read in fixed-size chunks by this process and encoded by a pool of workers; results are written in
input order, so the output is byte-identical whatever the worker count. Bad lines (invalid JSON or
UTF-8, not an object, missing key, value not text) are skipped and counted; blank lines are ignored.
As in Megatron's tool, a text that tokenizes to nothing becomes a document with no sequence, and the
eos id is appended (``--append-eos``) only to non-empty documents. The token dtype follows Megatron's
rule: uint16 when the vocab is under 65500 ids, else int32.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

EOS_TOKEN = "<\uff5cend\u2581of\u2581sentence\uff5c>"
CHUNK_LINES = 256  # lines per task; fixed, so chunking never depends on the worker count
BAD_REASONS = ("invalid_json", "not_object", "missing_key", "not_text")

# Worker state, set by _init_worker (or directly when encoding in-process).
_TOK = None
_KEY = "text"
_EOS: int | None = None
_DTYPE = np.dtype(np.int32)


@dataclass
class TokenizeStats:
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    lines: int = 0  # non-blank lines read
    empty_documents: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_REASONS, 0))
    bytes_read: int = 0
    seconds: float = 0.0
    dtype: str = ""

    @property
    def bad_lines(self) -> int:
        return sum(self.bad.values())

    def count(self, tokens: np.ndarray, seq_lengths: np.ndarray, per_doc: np.ndarray, bad: dict[str, int]) -> None:
        """Add the counts of one encoded chunk (what _encode_chunk returns)."""
        self.documents += per_doc.size
        self.sequences += seq_lengths.size
        self.tokens += tokens.size
        self.empty_documents += int(np.count_nonzero(per_doc == 0))
        for k, v in bad.items():
            self.bad[k] += v
        self.lines += per_doc.size + sum(bad.values())

    def summary(self, prefix: str) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        bad = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.bad.items() if v)
        return (
            f"tokenized {self.documents} documents ({self.sequences} sequences, {self.tokens} tokens, "
            f"{self.empty_documents} empty) from {self.lines} lines in {self.seconds:.1f}s ({rate:,.0f} tok/s); "
            f"skipped {self.bad_lines} bad lines{f' ({bad})' if bad else ''}; "
            f"wrote {prefix}.bin/.idx ({self.dtype})"
        )


def _init_worker(tokenizer_path: str, json_key: str, eos_id: int | None, dtype: str) -> None:
    global _TOK, _KEY, _EOS, _DTYPE
    # One core per worker: keep the Rust side from spawning its own thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_file(tokenizer_path)
    _TOK.no_truncation()
    _TOK.no_padding()
    _KEY, _EOS, _DTYPE = json_key, eos_id, np.dtype(dtype)


def _encode_chunk(lines: list[bytes]):
    """Encode raw JSONL lines -> (flat tokens, sequence lengths, sequences per document, bad counts)."""
    ids: list[int] = []
    seq_lengths: list[int] = []
    per_doc: list[int] = []
    bad = dict.fromkeys(BAD_REASONS, 0)
    for raw in lines:
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            bad["invalid_json"] += 1
            continue
        if not isinstance(obj, dict):
            bad["not_object"] += 1
            continue
        if _KEY not in obj:
            bad["missing_key"] += 1
            continue
        value = obj[_KEY]
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, list) and all(isinstance(t, str) for t in value):
            texts = value
        else:
            bad["not_text"] += 1
            continue
        n = 0
        for text in texts:
            if not text:
                continue
            enc = _TOK.encode(text, add_special_tokens=False).ids
            if enc:
                ids.extend(enc)
                seq_lengths.append(len(enc))
                n += 1
        if n and _EOS is not None:
            ids.append(_EOS)
            seq_lengths[-1] += 1
        per_doc.append(n)
    tokens = np.asarray(ids, dtype=np.int64)
    if tokens.size and (tokens.min() < np.iinfo(_DTYPE).min or tokens.max() > np.iinfo(_DTYPE).max):
        raise ValueError(f"token id {int(tokens.max())} does not fit {_DTYPE.name}")
    return tokens.astype(_DTYPE), np.asarray(seq_lengths, np.int64), np.asarray(per_doc, np.int64), bad


def _read_chunks(paths: Sequence[str]) -> Iterator[tuple[list[bytes], int]]:
    """(non-blank lines, bytes they came from) in chunks of CHUNK_LINES lines, across all files in order."""
    chunk: list[bytes] = []
    nbytes = 0
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                nbytes += len(line)
                if not line.strip():
                    continue
                chunk.append(line)
                if len(chunk) == CHUNK_LINES:
                    yield chunk, nbytes
                    chunk, nbytes = [], 0
    if chunk or nbytes:
        yield chunk, nbytes


class _Progress:
    """A one-line \\r progress display on stderr (periodic plain lines when stderr is not a terminal)."""

    def __init__(self, total_bytes: int, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.interval = 0.2 if self.tty else 30.0
        self.total = max(total_bytes, 1)
        self.start = self.last = time.perf_counter()
        self.width = 0

    def update(self, stats: TokenizeStats, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        frac = min(stats.bytes_read / self.total, 1.0)
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("inf")
        eta_s = "?" if eta == float("inf") else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        line = (
            f"{frac * 100:5.1f}% | {stats.documents:,} docs | {stats.tokens:,} tokens | "
            f"{stats.tokens / elapsed:,.0f} tok/s | ETA {eta_s} | {stats.bad_lines} bad"
        )
        if self.tty:
            pad = " " * max(self.width - len(line), 0)  # blank what a longer previous line left
            self.width = len(line)
            self.stream.write("\r" + line + pad + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _check_tokenizer(tokenizer: str, append_eos: bool) -> tuple[int | None, np.dtype]:
    """(eos id to append or None, token dtype) of a tokenizers JSON file; a missing or unreadable file, or
    ``append_eos`` without an eos token, is an error here, before any work."""
    from tokenizers import Tokenizer

    from vlpretrain.data.indexed import best_dtype

    if not os.path.isfile(tokenizer):
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer}")
    try:
        tok = Tokenizer.from_file(tokenizer)
    except Exception as e:  # tokenizers raises a bare Exception
        from vlpretrain.errors import UserError

        raise UserError(f"tokenizer {tokenizer}: not a tokenizers JSON file ({(str(e).splitlines() or ['?'])[0]})") \
            from None
    eos_id = None
    if append_eos:
        eos_id = tok.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"--append-eos: tokenizer {tokenizer} has no {EOS_TOKEN!r} token")
    return eos_id, best_dtype(tok.get_vocab_size())


def _encode_in_pool(chunks: Iterator[tuple[list[bytes], int]], workers: int, init_args: tuple, consume) -> None:
    """``consume(encoded, nbytes)`` for every chunk, in input order, encoded by a pool of ``workers`` processes.

    Pool.imap would read the whole input ahead (its feeder thread does not wait), so keep a bounded window of
    ordered async results instead. The pool ends with close() + join(): workers leave at the end-of-work
    sentinel, not by SIGTERM (terminate() only on an error, where a worker may be mid-chunk)."""
    pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=init_args)
    try:
        pending: deque = deque()
        for chunk, nbytes in chunks:
            pending.append((pool.apply_async(_encode_chunk, (chunk,)), nbytes))
            if len(pending) >= 4 * workers:
                result, done = pending.popleft()
                consume(result.get(), done)
        while pending:
            result, done = pending.popleft()
            consume(result.get(), done)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def tokenize_corpus(
    inputs: Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike,
    output_prefix: str | os.PathLike,
    json_key: str = "text",
    workers: int = 1,
    append_eos: bool = False,
    progress: bool = True,
) -> TokenizeStats:
    """Tokenize JSONL ``inputs`` into ``output_prefix``.bin/.idx; returns the counts.

    ``workers <= 1`` encodes in this process; more uses a process pool with a bounded number of
    chunks in flight (memory stays flat however large the corpus). ``progress`` shows a \\r-updated
    line on stderr when it is a terminal, else a plain line every 30 s and at the end.
    """
    from vlpretrain.data.indexed import IndexedDatasetWriter

    paths = [os.fspath(p) for p in inputs]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"input file not found: {p}")
    tokenizer = os.fspath(tokenizer)
    eos_id, dtype = _check_tokenizer(tokenizer, append_eos)
    init_args = (tokenizer, json_key, eos_id, dtype.name)

    stats = TokenizeStats(dtype=dtype.name)
    bar = _Progress(sum(os.path.getsize(p) for p in paths), progress)
    start = time.perf_counter()
    chunks = _read_chunks(paths)
    with IndexedDatasetWriter(output_prefix, dtype) as writer:

        def consume(result, nbytes: int) -> None:
            tokens, seq_lengths, per_doc, bad = result
            stats.bytes_read += nbytes
            writer.add_packed(tokens, seq_lengths, per_doc)
            stats.count(tokens, seq_lengths, per_doc, bad)
            bar.update(stats)

        if workers <= 1:
            _init_worker(*init_args)
            for chunk, nbytes in chunks:
                consume(_encode_chunk(chunk), nbytes)
        else:
            _encode_in_pool(chunks, workers, init_args, consume)
    stats.seconds = time.perf_counter() - start
    bar.update(stats, final=True)
    return stats


def add_parser(commands) -> None:
    """Register the ``tokenize`` subcommand on an argparse subparsers object."""
    p = commands.add_parser("tokenize", help="tokenize JSONL text into a Megatron indexed dataset (.bin/.idx)")
    p.add_argument("--input", nargs="+", required=True, help="JSONL files, read in the order given")
    p.add_argument("--tokenizer", required=True, help="a HF tokenizers tokenizer.json")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-key", default="text", help="the field holding the text (default: text)")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--append-eos", action="store_true", help="end every non-empty document with the eos id")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def run(args) -> int:
    stats = tokenize_corpus(
        args.input,
        args.tokenizer,
        args.output_prefix,
        json_key=args.json_key,
        workers=args.workers,
        append_eos=args.append_eos,
        progress=not args.no_progress,
    )
    print(stats.summary(args.output_prefix))
    return 0
