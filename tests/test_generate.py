"""Greedy decoding (vlpretrain/eval/generate.py, ``vlpretrain generate``): against transformers' greedy
``generate`` on the HF export of a tiny model, and KV-cache decoding against recomputing the whole sequence."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.checkpoint.hf_llama import export_hf_llama
from vlpretrain.eval.generate import generate, load_images, prompt_ids
from vlpretrain.models.vlm import build_model

transformers = pytest.importorskip("transformers")

NEW = 20
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_cfg):
    torch.manual_seed(0)
    m = build_model(tiny_cfg.model, seed=3).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights large enough that greedy picks are far from ties and vary
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        m.head.output.weight.mul_(20.0)  # logits far apart: no near-tie flips between two float paths
    return m


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(tokenizer, cfg):
    return [prompt_ids(tokenizer, cfg.model, "What colour is the circle?"),
            prompt_ids(tokenizer, cfg.model, "Once upon a time there was", chat=False)]


def test_text_tokens_match_transformers_greedy_generate(model, tiny_cfg, tokenizer, tmp_path):
    out = export_hf_llama(model, tiny_cfg.model, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    hf.generation_config.eos_token_id = None  # run all NEW steps, as ours with eos_id=None
    for ids in _prompts(tokenizer, tiny_cfg):
        ours = generate(model, ids, max_new_tokens=NEW)
        with torch.no_grad():
            x = torch.tensor([ids])  # an explicit mask: BOS is id 0, which HF would otherwise take for padding
            theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=tokenizer.pad_id, suppress_tokens=[tiny_cfg.model.image_token_id])
            theirs = theirs[0, len(ids):].tolist()
        assert len(ours) == NEW and len(set(ours)) > 3  # a real continuation, not one repeated token
        assert ours == theirs


def test_kv_cache_equals_recomputing_the_sequence(model, tiny_cfg, tokenizer, tmp_path):
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(img)
    images = load_images([img], tiny_cfg.model)
    m = tiny_cfg.model
    assert images.shape == (1, 1, 3, m.image_size, m.image_size)
    with_image = prompt_ids(tokenizer, m, "Describe it.", n_images=1)
    assert with_image.count(m.image_token_id) == m.image_tokens  # the placeholder, expanded as in training
    for ids, imgs in [(_prompts(tokenizer, tiny_cfg)[0], None), (with_image, images)]:
        cached = generate(model, ids, imgs, max_new_tokens=NEW)
        full = generate(model, ids, imgs, max_new_tokens=NEW, use_cache=False)
        assert cached == full and len(set(cached)) > 3
    # the image matters: the same prompt on another image continues differently
    other = generate(model, with_image, torch.zeros_like(images), max_new_tokens=NEW)
    assert other != generate(model, with_image, images, max_new_tokens=NEW)


def test_stops_at_eos_and_max_seq_len(model, tiny_cfg, tokenizer):
    ids = _prompts(tokenizer, tiny_cfg)[1]
    free = generate(model, ids, max_new_tokens=NEW)
    assert generate(model, ids, max_new_tokens=NEW, eos_id=free[4]) == free[:free.index(free[4]) + 1]
    long_prompt = (ids * 1000)[:tiny_cfg.model.max_seq_len - 3]
    assert len(generate(model, long_prompt, max_new_tokens=NEW)) == 3


def test_cli_generate(model, tiny_cfg, tokenizer, demo_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    from vlpretrain.cli import main

    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    img = tmp_path / "img.png"
    Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8)).save(img)

    def run(prompt: str) -> int:
        return main(["generate", "--config", str(REPO / "configs" / "tiny" / "stage2.yaml"), "--weights", str(weights),
                     "--image", str(img), "--prompt", prompt, "--max-new-tokens", "5", "--json", "--set",
                     f"data.root={demo_dir}"])

    assert run("What is it?") == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = prompt_ids(tokenizer, tiny_cfg.model, "What is it?", 1, system_prompt=tiny_cfg.data.system_prompt)
    want = generate(model, ids, load_images([img], tiny_cfg.model), 5, eos_id=tokenizer.eos_id)
    assert (got["prompt_tokens"], got["new_tokens"]) == (len(ids), want)
    # two placeholders for one image: one line, exit 2
    assert run("<image_placeholder> and <image_placeholder>") == 2
    assert "2 <image_placeholder> marks but 1 images" in capsys.readouterr().err
