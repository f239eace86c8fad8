"""Per-sample sizes: what the global step plan needs, so that planning reads sizes, not text.

The plan of a global step (which samples, which packed row each goes to, which draws are skipped as bad, the
loss denominator) depends only on every sample's size: its text tokens (the input ids without image
placeholders, BOS included), its supervised labels and its image count (tokens = text + images x image_tokens).
Every rank computes the same plan from these numbers and then reads, tokenises and decodes only its own dp
slice. A sample that cannot be used (corrupt JSON, no text, placeholder/image mismatch, nothing supervised,
out-of-vocabulary corpus ids) is recorded as bad, with the reason, when its size is indexed, so every rank
skips the same draws; "longer than seq_len" is decided at plan time from the size.

Where the sizes live (each rebuilt when what it depends on changes; written best effort, a read-only data
directory just recomputes them at every start):

* ``shards``: in the shard's own index ``<shard>.idx.json``, under ``"sizes": {"key": K, "samples": [...]}``,
  one ``[text, labels, images]`` or reason string per sample. ``K`` hashes the tokenizer file and the system
  prompt: another tokenizer recomputes them. A re-indexed shard (changed content) drops them.
* ``jsonl``: ``<file>.sizes.json`` next to the file, same entries, keyed by ``K`` and the file's content hash.
* ``indexed`` (``.bin/.idx``): chunk sizes follow from the .idx lengths (no tokenizer involved); only the
  vocabulary check needs the tokens, so ``PREFIX.sizes.npz`` keeps every chunk's smallest and largest id,
  keyed by the .idx fingerprint and the chunk length (= seq_len).

``python -m data_tools index --config C`` builds them ahead of a run (training start-up builds missing ones).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlpretrain.data.encoding import SampleEncoder, count_labels
from vlpretrain.files import write_json_atomic

log = logging.getLogger(__name__)

SIZES_VERSION = 1
_ERRORS = (ValueError, KeyError, TypeError, OSError)  # an unusable sample (BadSample is a ValueError)


@dataclass
class SizeTable:
    """Sizes of a source's samples; ``reasons`` holds the bad ones (their sizes are 0)."""

    text: np.ndarray  # int32: input tokens without image placeholders (BOS included)
    labels: np.ndarray  # int32: supervised tokens
    images: np.ndarray  # int32: images
    reasons: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.text)


def sizes_key(tokenizer, system_prompt: str) -> str:
    """What text sizes depend on: the tokenizer file and the system prompt (SFT), and this format."""
    text = f"{tokenizer.fingerprint}\0{system_prompt}\0{SIZES_VERSION}"
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def size_encoder(tokenizer, system_prompt: str) -> SampleEncoder:
    """An encoder that sizes samples: one placeholder token per image, nothing cut (sizes do not depend on
    seq_len or image_tokens)."""
    return SampleEncoder(tokenizer, 1, 1 << 40, system_prompt, truncate=False)


def record_size(encoder: SampleEncoder, record: dict) -> list[int]:
    """[text, labels, images] of one record; raises like the loader's encode on an unusable sample."""
    images = record.get("images") or []
    if not isinstance(images, list):
        raise ValueError("'images' must be a list")
    s = encoder.encode(record)
    n = len(s.images)
    return [len(s.tokens) - n, count_labels(s.labels), n]


def table_from_entries(entries: list) -> SizeTable:
    arr = np.zeros((len(entries), 3), dtype=np.int32)
    reasons = {}
    for i, e in enumerate(entries):
        if isinstance(e, str):
            reasons[i] = e
        else:
            arr[i] = e
    return SizeTable(arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy(), reasons)


def compute_entries(n: int, read_record, encoder: SampleEncoder) -> list:
    """One entry per sample: [text, labels, images] or the reason it cannot be used."""
    out: list = []
    for i in range(n):
        try:
            out.append(record_size(encoder, read_record(i)))
        except _ERRORS as e:
            out.append(str(e) or type(e).__name__)
    return out


def try_write_json_atomic(path: Path, obj) -> bool:
    """Best effort (a read-only data directory keeps what it has): True if written."""
    try:
        write_json_atomic(path, obj)
        return True
    except OSError:
        return False


def announce(name: str, n: int, t0: float) -> None:
    log.warning("data source '%s': indexed the sizes of %d samples in %.1f s (stored for the next start; "
                "`python -m data_tools index --config ...` does it ahead)", name, n, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- indexed corpora


def chunk_id_range(ds, starts: np.ndarray, lengths: np.ndarray, block: int = 1 << 16) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """(min id, max id) of every chunk ``[starts[i], starts[i] + lengths[i])`` (token offsets into .bin), in
    blocks of chunks (one pass over the corpus, bounded memory). Chunks tile the .bin in order."""
    n = len(starts)
    lo, hi = np.zeros(n, np.int64), np.zeros(n, np.int64)
    if n == 0:
        return lo, hi
    data = np.frombuffer(ds._bin_mm, dtype=ds.dtype)
    for a in range(0, n, block):
        b = min(a + block, n)
        seg = data[int(starts[a]):int(starts[b - 1] + lengths[b - 1])]
        local = (starts[a:b] - starts[a]).astype(np.int64)
        lo[a:b] = np.minimum.reduceat(seg, local)
        hi[a:b] = np.maximum.reduceat(seg, local)
    return lo, hi


def idx_fingerprint(prefix: str) -> str:
    from vlpretrain.data.shard_index import fingerprint

    return f"{fingerprint(prefix + '.idx')}:{os.path.getsize(prefix + '.bin')}"
