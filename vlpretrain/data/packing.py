"""Stage-2 sequence packing: several encoded samples (documents) per fixed-length row.

Policy (deterministic, depends only on the input order): **first fit in arrival order**. Samples are taken in
the order given; each goes into the first row, in creation order, whose remaining space holds the whole sample,
or opens a new row at the end. Rows are returned in creation order and a row's documents keep their relative
arrival order. A document is never split across rows (hence an image's placeholder run never is either); a
sample longer than ``seq_len`` is rejected with ValueError (bad data for the loader: see ``check_sample``).

Per row:

* ``tokens`` / ``labels``: the documents' own tokens and labels, concatenated verbatim. A sample's labels are
  its next-token targets *within the sample* (``labels[i]`` is the target of ``tokens[i]``, and the last label
  is the sample's own final target, typically eos, or IGNORE), so the last token of a document never predicts
  the first token of the next one: nothing needs relabelling at document boundaries.
* ``positions``: 0, 1, 2, ... restarting at 0 at each document start (rotary positions as if unpacked).
* ``doc_ids``: 1, 2, 3, ... per document in the row, 0 on padding (feed to ``DeepSeekVL(doc_ids=...)`` for
  document-causal attention).
* ``images``: the documents' image paths concatenated, i.e. in placeholder order along the row, which is the
  order ``VisionLanguageEmbedding`` splices them in.
* padding: ``pad_id`` tokens, IGNORE labels, position 0, doc id 0.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from vlpretrain.data.encoding import IGNORE, EncodedSample


@dataclass
class PackedRow:
    tokens: list[int]
    labels: list[int]
    positions: list[int]
    doc_ids: list[int]
    images: list[str] = field(default_factory=list)
    n_docs: int = 0

    @property
    def used(self) -> int:
        """Non-padding tokens in the row."""
        return sum(1 for d in self.doc_ids if d != 0)


def check_sample(sample: EncodedSample, seq_len: int, image_token_id: int,
                 image_tokens: int | None = None) -> None:
    """Raise ValueError if ``sample`` cannot be packed into rows of ``seq_len`` (the loader's bad data):
    empty, tokens/labels of different lengths, longer than ``seq_len``, or image placeholders that do not match
    its images (exactly ``image_tokens`` per image when given, else an equal share per image)."""
    n = len(sample.tokens)
    if n == 0:
        raise ValueError("empty sample")
    if len(sample.labels) != n:
        raise ValueError(f"sample has {n} tokens but {len(sample.labels)} labels")
    if n > seq_len:
        raise ValueError(f"sample of {n} tokens does not fit in seq_len={seq_len}")
    n_img_tokens = sum(1 for t in sample.tokens if t == image_token_id)
    n_images = len(sample.images)
    if image_tokens is not None:
        if n_img_tokens != n_images * image_tokens:
            raise ValueError(f"{n_img_tokens} image placeholder tokens for {n_images} images of {image_tokens}")
    elif (n_images == 0) != (n_img_tokens == 0) or (n_images and n_img_tokens % n_images):
        raise ValueError(f"{n_img_tokens} image placeholder tokens for {n_images} images")


def pack_samples(samples: list[EncodedSample], seq_len: int, image_token_id: int, pad_id: int,
                 image_tokens: int | None = None) -> list[PackedRow]:
    """Pack ``samples`` into rows of exactly ``seq_len`` tokens, first fit in arrival order (module docstring).

    Raises ValueError (naming the sample's index) if any sample fails ``check_sample``, in particular one longer
    than ``seq_len``; the caller filters such samples out beforehand with ``check_sample`` to count them as bad
    data. ``image_tokens`` (optional) makes the placeholder check exact.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if pad_id == image_token_id:
        raise ValueError("pad_id must differ from image_token_id (padding would read as image placeholders)")
    for i, s in enumerate(samples):
        try:
            check_sample(s, seq_len, image_token_id, image_tokens)
        except ValueError as e:
            raise ValueError(f"sample {i}: {e}") from None

    fit = FirstFit(seq_len, max(len(samples), 1))
    for k, s in enumerate(samples):
        fit.place(len(s.tokens), k)
    return [fill_row([samples[k] for k in docs], seq_len, pad_id) for docs in fit.rows]


class FirstFit:
    """First fit in arrival order over at most ``max_rows`` rows of ``capacity`` tokens: the one implementation
    of the policy (``pack_samples`` and the loader's step planner both use it).

    ``place(n, item)`` puts the item into the first row, in creation order, whose room is >= n, opening the next
    row when none has room; it returns the row, or None when no row has room and all ``max_rows`` are open (the
    item is not placed). ``place_many`` does the same for a run of items, stopping at the first that fits nowhere.

    How: the answer is always a *record*, a row whose room exceeds the room of every row before it (the first
    row with room >= n has only rows with room < n before it). The records' rooms increase with the row, so a
    binary search over them (``bisect``, in C) finds the row; unopened rows hold ``capacity``, so the first
    unopened one is the last record. Placing an item lowers one record's room; only the rows between it and the
    next record can become records then, and they are re-examined (usually none or a few)."""

    def __init__(self, capacity: int, max_rows: int):
        self.capacity, self.max_rows = capacity, max_rows
        self.rows: list[list] = []  # the items of every open row, in arrival order
        self._room = [capacity] * max_rows  # room left in every row (unopened ones: capacity)
        self._rec_rows = [0] if max_rows > 0 else []  # the records: rows, ascending
        self._rec_room = [capacity] if max_rows > 0 else []  # and their rooms, strictly ascending

    @property
    def free(self) -> list[int]:
        """Room left in every open row."""
        return self._room[:len(self.rows)]

    def place(self, n: int, item=None) -> int | None:
        got = self.place_many((n,), (item,))
        return got[0] if got else None

    def place_many(self, sizes, items=None) -> list[int]:
        """Place ``sizes[k]`` (as ``items[k]``, default k) in order; stop at the first that fits no row.
        Returns the rows of the placed ones (fewer than ``len(sizes)`` if one did not fit)."""
        recs, rooms, room, rows, out = self._rec_rows, self._rec_room, self._room, self.rows, []
        bisect_left, max_rows, opened = bisect.bisect_left, self.max_rows, len(self.rows)
        for item, n in zip(range(len(sizes)) if items is None else items, sizes):
            p = bisect_left(rooms, n)
            if p == len(rooms):
                break
            r = recs[p]
            v = room[r] = room[r] - n
            if r == opened:
                rows.append([item])
                opened += 1
            else:
                rows[r].append(item)
            out.append(r)
            # keep the records: row r (room v now) and the rows up to the next record
            if p + 1 < len(recs):
                end = recs[p + 1]
            else:
                end = opened + 1 if opened < max_rows else opened
            if p and v <= rooms[p - 1]:
                del recs[p], rooms[p]
                top, q = rooms[p - 1], p
            else:
                rooms[p] = v
                top, q = v, p + 1
            if end - r > 1:
                new_rows, new_rooms = _records(room, r + 1, end, top)
                if new_rows:
                    recs[q:q] = new_rows
                    rooms[q:q] = new_rooms
        return out

def _records(room: list[int], a: int, b: int, top: int) -> tuple[list[int], list[int]]:
    """Rows in [a, b) whose room exceeds ``top`` and every room before them in the range."""
    if b - a <= 64:
        rows, rooms = [], []
        for j in range(a, b):
            x = room[j]
            if x > top:
                rows.append(j)
                rooms.append(x)
                top = x
        return rows, rooms
    seg = np.array(room[a:b], dtype=np.int64)  # a long stretch (rare): vectorised
    before = np.maximum.accumulate(np.concatenate(([top], seg[:-1])))
    hit = np.flatnonzero(seg > before)
    return (hit + a).tolist(), seg[hit].tolist()


def fill_row(docs: list[EncodedSample], seq_len: int, pad_id: int) -> PackedRow:
    """One row of ``seq_len`` tokens from its documents (in order), padded at the end."""
    tokens: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    doc_ids: list[int] = []
    images: list = []
    for d, s in enumerate(docs, start=1):
        n = len(s.tokens)
        tokens += s.tokens
        labels += s.labels
        positions += range(n)
        doc_ids += [d] * n
        images += s.images
    room = seq_len - len(tokens)
    tokens += [pad_id] * room
    labels += [IGNORE] * room
    positions += [0] * room
    doc_ids += [0] * room
    return PackedRow(tokens, labels, positions, doc_ids, images, len(docs))


def to_tensors(rows: list[PackedRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate packed rows: (tokens, labels, positions, doc_ids), each (B, S) long. Images are left to the
    caller: row b's ``rows[b].images`` go, in order, into ``images[b, :len(rows[b].images)]`` of a
    (B, M, 3, H, W) tensor, exactly as for unpacked samples."""
    if not rows:
        raise ValueError("no rows to collate")
    lengths = {len(r.tokens) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"rows of different lengths {sorted(lengths)}")

    def col(name: str) -> torch.Tensor:
        return torch.stack([torch.as_tensor(getattr(r, name), dtype=torch.long) for r in rows])

    return col("tokens"), col("labels"), col("positions"), col("doc_ids")
