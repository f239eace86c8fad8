"""What the evaluations score: rows of tokens + labels (+ images), and how rows become microbatches."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlpretrain.data.encoding import IGNORE
from vlpretrain.data.loader import Microbatch


@dataclass
class EvalRow:
    tokens: list[int]  # inputs, at most train.seq_len
    labels: list[int]  # next-token targets, IGNORE where not scored
    images: list[torch.Tensor] = field(default_factory=list)  # (3, H, W) each, in placeholder order


def to_microbatches(rows: list[EvalRow], micro_batch_size: int, seq_len: int, pad_id: int, count: int,
                    with_images: bool, image_shape: tuple[int, ...]) -> list[Microbatch]:
    """``count`` microbatches of ``micro_batch_size`` rows padded to ``seq_len`` (the training shapes, which
    a pipeline needs); missing rows are padding that scores nothing. ``with_images``: every microbatch gets
    an image tensor (slots padded with zeros), so every rank runs the vision towers in every microbatch."""
    out = []
    for k in range(count):
        chunk = rows[k * micro_batch_size:(k + 1) * micro_batch_size]
        tokens = torch.full((micro_batch_size, seq_len), pad_id, dtype=torch.long)
        labels = torch.full((micro_batch_size, seq_len), IGNORE, dtype=torch.long)
        slots = max((len(r.images) for r in chunk), default=0)
        images = torch.zeros(micro_batch_size, slots, *image_shape) if with_images else None
        for i, row in enumerate(chunk):
            tokens[i, :len(row.tokens)] = torch.tensor(row.tokens)
            labels[i, :len(row.labels)] = torch.tensor(row.labels)
            for j, img in enumerate(row.images):
                images[i, j] = img
        out.append(Microbatch(tokens, labels, images))
    return out
