"""Greedy decoding with a KV cache: what a checkpoint says to a prompt (``vlpretrain generate``).

Plain PyTorch on one process over ``DeepSeekVL`` (``models/vlm.py``): the prompt (with its images spliced in, as
in training) runs once and fills one ``KVCache`` per decoder block (``models/llm.py``); each new token then runs
alone against the cache. Only the last position goes through the output head. Images take the same path as
eval (``eval/mcppl.py``): ``data/preprocess.py`` (DeepSeek-VL's image processor) and ``image_tokens``
placeholders per ``<image_placeholder>``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vlpretrain.config import ModelConfig
from vlpretrain.data.preprocess import load_image, preprocess_image
from vlpretrain.data.tokenizer import IMAGE, TextTokenizer
from vlpretrain.errors import UserError
from vlpretrain.models.llm import KVCache
from vlpretrain.models.vlm import DeepSeekVL


def prompt_ids(tokenizer: TextTokenizer, cfg: ModelConfig, prompt: str, n_images: int = 0, chat: bool = True,
               system_prompt: str = "") -> list[int]:
    """BOS + the prompt, each ``<image_placeholder>`` expanded to ``image_tokens`` ids (as ``SampleEncoder``).
    ``chat``: in the SFT chat format, ending where the assistant's answer starts ("Assistant: "); images without
    a placeholder in the prompt are put at its start (as DeepSeek-VL's examples)."""
    missing = n_images - prompt.count(IMAGE)
    if missing < 0:
        raise UserError(f"the prompt has {prompt.count(IMAGE)} {IMAGE} marks but {n_images} images were given")
    prompt = IMAGE * missing + prompt
    if chat:
        prompt = (f"{system_prompt}\n\n" if system_prompt else "") + f"User: {prompt}\n\nAssistant: "
    ids = [tokenizer.bos_id]
    for i, piece in enumerate(prompt.split(IMAGE)):
        if i > 0:
            ids += [tokenizer.image_id] * cfg.image_tokens
        if piece:
            ids += tokenizer.encode(piece)
    return ids


def load_images(paths: Sequence[str | Path], cfg: ModelConfig) -> torch.Tensor | None:
    """(1, M, 3, S, S) float in [0, 1] as the data path makes them (padding with the first tower's mean)."""
    if not paths:
        return None
    pad_mean = cfg.sam.mean if cfg.sam.enabled else cfg.siglip.mean
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image not found: {p}")
    return torch.stack([preprocess_image(load_image(p), cfg.image_size, pad_mean) for p in paths])[None]


def _logits(model: DeepSeekVL, tokens: torch.Tensor, images: torch.Tensor | None,
            caches: list[KVCache] | None) -> torch.Tensor:
    """Next-token logits (B, V) after ``tokens`` (B, S), the positions after the cached ones."""
    h = model.embed(tokens, images)
    for i, layer in enumerate(model.layers.values()):
        h = layer(h, None, None, cache=caches[i]) if caches is not None else layer(h)
    return model.head(h[:, -1:]).float()[:, -1]


@torch.no_grad()
def generate(model: DeepSeekVL, ids: Sequence[int], images: torch.Tensor | None = None, max_new_tokens: int = 64,
             eos_id: int | None = None, use_cache: bool = True) -> list[int]:
    """Greedy continuation of one prompt (token ids, images (1, M, 3, S, S) or None): the new ids, stopping after
    ``eos_id`` (included), ``max_new_tokens`` or at ``max_seq_len``. ``use_cache=False`` recomputes the whole
    sequence each step (the reference the cache is tested against). The image placeholder id is never chosen.
    """
    device = next(model.parameters()).device
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
    if images is not None:
        images = images.to(device)
    limit = min(max_new_tokens, model.cfg.max_seq_len - tokens.shape[1])
    if limit < 0:
        raise UserError(f"the prompt has {tokens.shape[1]} tokens, more than model.max_seq_len="
                        f"{model.cfg.max_seq_len}")
    caches = [KVCache() for _ in model.layers] if use_cache else None
    out: list[int] = []
    step_in = tokens
    for _ in range(limit):
        # the images enter once, with the prompt; later steps are text tokens only
        logits = _logits(model, step_in if use_cache else tokens, images if (not out or not use_cache) else None,
                         caches)
        logits[:, model.cfg.image_token_id] = float("-inf")  # placeholders come with images, never generated
        nxt = int(logits[0].argmax())
        out.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        step_in = torch.tensor([[nxt]], dtype=torch.long, device=device)
        tokens = torch.cat([tokens, step_in], dim=1)
    return out
