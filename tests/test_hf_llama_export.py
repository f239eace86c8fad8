"""Export to the HF LLaMA layout (vlpretrain/checkpoint/hf_llama.py): transformers' LlamaForCausalLM loads it and
gives our logits; our HF importer reads it back.

Tiny models only, no network: HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from export_helpers import (
    LLAMA_FIELDS,
    TOKENS,
    _model,
    _randomise,
    tiny_hybrid,
)
from safetensors import safe_open

from vlpretrain.checkpoint.hf_llama import export_hf_llama
from vlpretrain.checkpoint.pretrained import load_hf_llm

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")



def test_hf_llama_export_matches_logits(tmp_path):
    model = _randomise(_model(tiny_hybrid()), seed=1)
    out = export_hf_llama(model, model.cfg, tmp_path / "hf")
    cfg_json = json.loads((out / "config.json").read_text())
    for k, v in LLAMA_FIELDS.items():
        assert cfg_json[k] == v, k
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:  # the LLM only, HF names
        keys = set(f.keys())
    assert "lm_head.weight" in keys and "model.layers.3.mlp.down_proj.weight" in keys
    assert not any(k.startswith(("embed.", "vision", "aligner")) for k in keys)

    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    assert hf.dtype == torch.float32
    with torch.no_grad():
        diff = (hf(TOKENS).logits - model(TOKENS)).abs().max().item()
    assert diff < 1e-5

    # our own HF importer reads it back bit for bit
    fresh = _model(tiny_hybrid(), seed=5)
    load_hf_llm(fresh, out)
    for k, v in model.state_dict().items():
        if k.startswith(("layers.", "head.", "embed.tok_embeddings")):
            assert torch.equal(fresh.state_dict()[k], v), k


def test_hf_llama_sharded_and_atomic(tmp_path):
    model = _randomise(_model(tiny_hybrid()), seed=2)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    export_hf_llama(model.state_dict(), model.cfg, out, shard_bytes=40_000)
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert "stale.bin" not in names and "model.safetensors.index.json" in names and len(shards) > 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        v.numel() * 4 for k, v in model.state_dict().items() if not k.startswith("embed.vision")
        and not k.startswith("embed.adaptor"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp / old dirs left behind

    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert (hf(TOKENS).logits - model(TOKENS)).abs().max().item() < 1e-5

