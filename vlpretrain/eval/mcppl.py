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

from vlpretrain.config import Config
from vlpretrain.data.encoding import SampleEncoder
from vlpretrain.data.preprocess import load_image, preprocess_image
from vlpretrain.data.tokenizer import IMAGE, TextTokenizer
from vlpretrain.errors import UserError
from vlpretrain.eval.rows import EvalRow


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


def _as_sample(it: dict, option: str) -> dict:
    return {"images": it.get("images") or [], "conversation": [
        {"role": "User", "content": it["question"]}, {"role": "Assistant", "content": option}]}


def mcppl_rows(items: list[dict], cfg: Config, tokenizer: TextTokenizer, root: Path) -> list[EvalRow]:
    """One row per (item, option): the option as the assistant's answer, only it (and EOS) supervised."""
    m = cfg.model
    pad_mean = m.sam.mean if m.sam.enabled else m.siglip.mean
    encoder = SampleEncoder(tokenizer, m.image_tokens, cfg.train.seq_len, cfg.data.system_prompt)
    rows = []
    for it in items:
        images = [preprocess_image(load_image(root / p), m.image_size, pad_mean) for p in it.get("images") or []]
        for opt in it["options"]:
            e = encoder.encode(_as_sample(it, opt))
            rows.append(EvalRow(e.tokens, e.labels, images))
    return rows


def mcppl_metrics(items: list[dict], scores: torch.Tensor) -> dict:
    """Pick each item's option of lowest mean NLL (log perplexity of the answer + EOS); accuracy overall and
    per question ``type``. ``scores``: (rows, 2) summed NLL and token count, rows as ``mcppl_rows``."""
    correct, by_type, r, nll_sum = 0, {}, 0, 0.0
    for it in items:
        k = len(it["options"])
        mean_nll = scores[r:r + k, 0] / scores[r:r + k, 1].clamp_min(1)
        nll_sum += float(mean_nll.sum())
        r += k
        ok = int(mean_nll.argmin()) == int(it["answer"])
        correct += ok
        hit, n = by_type.get(it.get("type", "all"), (0, 0))
        by_type[it.get("type", "all")] = (hit + ok, n + 1)
    n = max(len(items), 1)
    return {"accuracy": correct / n, "n": len(items), "chance": sum(1 / len(i["options"]) for i in items) / n,
            "option_nll": nll_sum / max(r, 1),  # mean over all options of their mean NLL: a smooth measure
            "by_type": {t: round(h / c, 4) for t, (h, c) in sorted(by_type.items())}}
