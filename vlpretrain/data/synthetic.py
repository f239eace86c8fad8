"""Synthetic batches of the configured shapes (random text, images spliced in): for equivalence tests,
benchmarks and the pipeline cost measurement, where real data is beside the point."""
from __future__ import annotations

import torch

from vlpretrain.config import Config
from vlpretrain.data.loader import Microbatch
from vlpretrain.data.samples import IGNORE


def synthetic_microbatches(cfg: Config, seed: int, images_per_sample: int = 2, pad_id: int = 3,
                           num_samples: int | None = None) -> tuple[list[Microbatch], int]:
    """``num_samples`` (default: the global batch) split into micro batches; returns them and the number of
    supervised tokens. Sample i carries a random 0..images_per_sample images (0 when images_per_sample is 0),
    placed after the first token and two tokens apart; the last few positions of a sample may be padding."""
    g = torch.Generator().manual_seed(seed)
    m, t = cfg.model, cfg.train
    n, s, it = num_samples or t.global_batch_size, t.seq_len, m.image_tokens
    if images_per_sample and 1 + images_per_sample * (it + 2) > s:
        raise ValueError(f"train.seq_len={s} cannot hold {images_per_sample} images of {it} tokens")
    low = max(m.image_token_id, pad_id) + 1
    tokens = torch.randint(low, m.vocab_size, (n, s + 1), generator=g)
    counts = torch.randint(0, images_per_sample + 1, (n,), generator=g)
    images = torch.rand(n, max(images_per_sample, 1), 3, m.image_size, m.image_size, generator=g)
    for i in range(n):
        for k in range(int(counts[i])):
            start = 1 + k * (it + 2)
            tokens[i, start:start + it] = m.image_token_id
        images[i, int(counts[i]):] = 0
    pad_from = torch.randint(max(s - 6, 1 + images_per_sample * (it + 2)), s + 1, (n,), generator=g)
    for i in range(n):
        tokens[i, pad_from[i]:] = pad_id
    inputs, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    targets[(targets == m.image_token_id) | (targets == pad_id)] = IGNORE
    mbs = t.micro_batch_size
    micro = [Microbatch(inputs[i:i + mbs], targets[i:i + mbs], images[i:i + mbs] if images_per_sample else None)
             for i in range(0, n, mbs)]
    return micro, int((targets != IGNORE).sum())
