"""Multi-choice perplexity evaluation (the paper's MCPPL): score each option by its perplexity given the prompt
and image(s), pick the lowest. The prompt uses the SFT chat format, so an option is scored exactly as an answer.

The eval file is JSONL, one item a line: ``question`` (text, one ``<image_placeholder>`` per image), ``options``
(answer texts), ``answer`` (index of the right option), optional ``images`` (paths relative to the file) and
``type`` (accuracy is also reported per type). :func:`check_eval_file` validates it at start-up, so a bad file
fails in one line before training rather than after it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlpretrain.config import Config
from vlpretrain.data.preprocess import load_image, preprocess_image
from vlpretrain.data.samples import IGNORE, SampleEncoder
from vlpretrain.data.tokenizer import IMAGE, TextTokenizer
from vlpretrain.errors import UserError


def _check_item(it, root: Path) -> str | None:
    """What is wrong with one eval item (None: fine)."""
    if not isinstance(it, dict):
        return "not a JSON object"
    question, options, answer = it.get("question"), it.get("options"), it.get("answer")
    images = it.get("images") or []
    if not isinstance(question, str):
        return "needs a 'question' string"
    if not isinstance(options, list) or not options or not all(isinstance(o, str) and o.strip() for o in options):
        return "needs 'options': a list of non-empty strings"
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
        return f"'answer' must be an option index 0..{len(options) - 1}, got {answer!r}"
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return "'images' must be a list of paths"
    for opt in options:
        n = question.count(IMAGE) + opt.count(IMAGE)
        if n != len(images):
            return f"{n} image placeholders but {len(images)} images"
    for p in images:
        if not (root / p).is_file():
            return f"image not found: {root / p}"
    return None


def check_eval_file(path: str | Path | None, cfg: Config | None = None,
                    tokenizer: TextTokenizer | None = None) -> list[dict] | None:
    """The items of a multi-choice eval file, validated (JSONL, fields, images present and, given ``cfg`` and
    ``tokenizer``, every option encodable within ``train.seq_len``); a problem raises a one-line ``UserError``
    naming the file and line. ``None``: no eval file, nothing to check."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"eval file {path}: not UTF-8 text (byte {e.start})") from None
    items: list[tuple[int, dict]] = []  # (line number, item)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            it = json.loads(line)
        except ValueError as e:
            raise UserError(f"eval file {path}: line {n}: not JSON ({e})") from None
        problem = _check_item(it, path.parent)
        if problem:
            raise UserError(f"eval file {path}: line {n}: {problem}")
        items.append((n, it))
    if not items:
        raise UserError(f"eval file {path}: no items")
    if cfg is not None and tokenizer is not None:
        encoder = SampleEncoder(tokenizer, cfg.model.image_tokens, cfg.train.seq_len, cfg.data.system_prompt)
        for n, it in items:
            for opt in it["options"]:
                try:
                    encoder.encode(_as_sample(it, opt))
                except ValueError as e:
                    raise UserError(f"eval file {path}: line {n}: {e} (train.seq_len={cfg.train.seq_len})") from None
    return [it for _, it in items]


def load_mc_items(path: str | Path) -> list[dict]:
    return check_eval_file(path)


def _as_sample(it: dict, option: str) -> dict:
    return {"images": it.get("images") or [], "conversation": [
        {"role": "User", "content": it["question"]}, {"role": "Assistant", "content": option}]}


@torch.no_grad()
def evaluate_mcppl(model: nn.Module, cfg: Config, tokenizer: TextTokenizer, path: str | Path,
                   device: torch.device, limit: int | None = None) -> dict:
    items = load_mc_items(path)[:limit]
    root = Path(path).parent
    m = cfg.model
    pad_mean = m.sam.mean if m.sam.enabled else m.siglip.mean
    encoder = SampleEncoder(tokenizer, m.image_tokens, cfg.train.seq_len, cfg.data.system_prompt)
    was_training = model.training
    model.eval()
    correct, by_type = 0, {}
    for it in items:
        encoded = [encoder.encode(_as_sample(it, opt)) for opt in it["options"]]
        width = max(len(e.tokens) for e in encoded)
        tokens = torch.full((len(encoded), width), tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
        for r, e in enumerate(encoded):
            tokens[r, :len(e.tokens)] = torch.tensor(e.tokens)
            labels[r, :len(e.labels)] = torch.tensor(e.labels)
        images = None
        if it.get("images"):
            pix = torch.stack([preprocess_image(load_image(root / p), m.image_size, pad_mean) for p in it["images"]])
            images = pix.unsqueeze(0).expand(len(encoded), -1, -1, -1, -1)
            images = images.to(device)
        logits = model(tokens.to(device), images).float()
        labels = labels.to(device)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none").sum(1)
        nll = nll / (labels != IGNORE).sum(1)  # mean NLL = log perplexity of the answer (+ eos)
        pred = int(nll.argmin())
        ok = pred == int(it["answer"])
        correct += ok
        t = it.get("type", "all")
        hit, n = by_type.get(t, (0, 0))
        by_type[t] = (hit + ok, n + 1)
    model.train(was_training)
    n = max(len(items), 1)
    return {"accuracy": correct / n, "n": len(items), "chance": sum(1 / len(i["options"]) for i in items) / n,
            "by_type": {t: round(h / c, 4) for t, (h, c) in sorted(by_type.items())}}
