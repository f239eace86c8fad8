"""Multi-choice perplexity evaluation (the paper's MCPPL): score each option by its perplexity given the prompt
and image(s), pick the lowest. The prompt uses the SFT chat format, so an option is scored exactly as an answer.
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
from vlpretrain.data.tokenizer import TextTokenizer


def load_mc_items(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval file not found: {path}")
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, it in enumerate(items):
        if not it.get("options") or not 0 <= int(it.get("answer", -1)) < len(it["options"]):
            raise ValueError(f"{path}: item {i} lacks options or a valid answer index")
    return items


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
        encoded = [encoder.encode({"images": it.get("images", []), "conversation": [
            {"role": "User", "content": it["question"]}, {"role": "Assistant", "content": opt}]})
            for opt in it["options"]]
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
