"""Synthetic batches of the configured shapes (random text, images spliced in): for equivalence tests,
benchmarks and the pipeline cost measurement, where real data is beside the point."""
from __future__ import annotations

import torch

from vlpretrain.config import Config
from vlpretrain.data.encoding import IGNORE
from vlpretrain.data.loader import Microbatch


def synthetic_microbatches(cfg: Config, seed: int, images_per_sample: int = 2, pad_id: int = 3,
                           num_samples: int | None = None, documents: int = 1) -> tuple[list[Microbatch], int]:
    """``num_samples`` (default: the global batch) split into micro batches; returns them and the number of
    supervised tokens. Sample i carries a random 0..images_per_sample images (0 when images_per_sample is 0),
    placed after the first token and two tokens apart; the last few positions of a sample may be padding.
    ``documents`` > 1 makes packed rows: the text after the images is cut into that many documents, with
    positions restarting and document ids (as ``data/packing.py`` produces them)."""
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
    positions = doc_ids = None
    if documents > 1:
        start = 1 + images_per_sample * (it + 2)
        doc_ids = torch.ones(n, s, dtype=torch.long)
        for i in range(n):
            cuts = sorted(torch.randint(start, s - 4, (documents - 1,), generator=g).tolist())
            for c in cuts:
                doc_ids[i, c:] += 1
            doc_ids[i, inputs[i] == pad_id] = 0
        first = torch.ones_like(doc_ids, dtype=torch.bool)
        first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        idx = torch.arange(s).expand(n, s)
        positions = idx - torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), dim=1).values
        targets[:, :-1][doc_ids[:, 1:] != doc_ids[:, :-1]] = IGNORE  # no target across a document boundary
    mbs = t.micro_batch_size
    micro = [Microbatch(inputs[i:i + mbs], targets[i:i + mbs], images[i:i + mbs] if images_per_sample else None,
                        positions[i:i + mbs] if positions is not None else None,
                        doc_ids[i:i + mbs] if doc_ids is not None else None)
             for i in range(0, n, mbs)]
    return micro, int((targets != IGNORE).sum())
