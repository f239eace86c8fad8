"""Evaluation in any layout: MCPPL on ``train.eval_file`` and bits per byte / perplexity on ``train.eval_text``.

Rows are built once (every rank alike, so every rank knows the whole set), split into contiguous dp shares,
and scored forward-only by the engine (``ParallelModel.score_rows``: through the pipeline stages, TP, FSDP)
in groups of the training step's microbatch count and shapes; every dp share runs the same number of groups
(padding rows score nothing), then the per-row scores are summed over dp so every rank holds all of them.
The metrics equal the single-process evaluation of the same weights (tests/test_eval_layouts.py).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from vlpretrain.config import Config
from vlpretrain.data.tokenizer import TextTokenizer
from vlpretrain.eval.mcppl import check_eval_file, mcppl_metrics, mcppl_rows
from vlpretrain.eval.rows import EvalRow, to_microbatches
from vlpretrain.eval.text import read_documents, text_metrics, text_rows


class Evaluator:
    def __init__(self, cfg: Config, tokenizer: TextTokenizer, eval_file: Path | None, eval_text: Path | None,
                 limit: int | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.sets: dict[str, tuple[list[EvalRow], object, bool]] = {}  # name -> rows, metrics fn, images
        if eval_file is not None:
            items = check_eval_file(eval_file, cfg, tokenizer)[:limit]
            rows = mcppl_rows(items, cfg, tokenizer, Path(eval_file).parent)
            self.sets["mcppl"] = (rows, lambda s, items=items: mcppl_metrics(items, s), True)
        if eval_text is not None:
            docs = read_documents(eval_text, tokenizer)
            self.sets["text"] = (text_rows(docs, cfg.train.seq_len), lambda s, docs=docs: text_metrics(docs, s),
                                 False)

    def __bool__(self) -> bool:
        return bool(self.sets)

    def run(self, model) -> dict:
        """Every rank calls this (collective); returns {"mcppl": {...}, "text": {...}, "eval_time_s": ...}."""
        t0 = time.perf_counter()
        out = {name: finish(self._scores(model, rows, images)) for name, (rows, finish, images) in self.sets.items()}
        out["eval_time_s"] = round(time.perf_counter() - t0, 3)
        return out

    def _scores(self, model, rows: list[EvalRow], with_images: bool) -> torch.Tensor:
        ctx, cfg = model.ctx, self.cfg
        lay, mb = ctx.layout, cfg.train.micro_batch_size
        n_mb = lay.n_microbatches
        share = -(-len(rows) // lay.dp)  # contiguous dp shares
        start = min(ctx.dp_rank * share, len(rows))
        mine = rows[start:start + share]
        groups = max(1, -(-share // (n_mb * mb)))  # the same on every dp rank (FSDP gathers in lockstep)
        m = cfg.model
        scores = torch.zeros(len(rows), 2, dtype=torch.float64, device=ctx.device)
        for g in range(groups):
            part = mine[g * n_mb * mb:(g + 1) * n_mb * mb]
            micro = to_microbatches(part, mb, cfg.train.seq_len, self.tokenizer.pad_id, n_mb, with_images,
                                    (3, m.image_size, m.image_size))
            got = model.score_rows(micro)[:len(part)]
            scores[start + g * n_mb * mb:start + g * n_mb * mb + len(part)] = got.double()
        if lay.dp > 1:
            dist.all_reduce(scores, group=ctx.submesh("dp").get_group())
        return scores.cpu()

