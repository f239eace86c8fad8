"""Tiny models and helpers shared by the export / import tests (test_hf_llama_export.py,
test_deepseek_vl_release.py, test_deepseek_vl_processor.py, test_state_dict_adapter.py).

Tiny models only, no network; the real 7B / 1.3B layouts are checked on meta-device models.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from vlpretrain.checkpoint.deepseek_vl import export_deepseek_vl
from vlpretrain.config import config_from_dict
from vlpretrain.models.vlm import build_model

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from equivalence_worker import tiny_hybrid as worker_tiny_hybrid  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE_ID = 2


def tiny_hybrid(**over) -> dict:
    """The model section of the equivalence worker's tiny hybrid model (SigLIP + SAM with neck_hd, GQA)."""
    return worker_tiny_hybrid(**{f"model.{k}": v for k, v in over.items()})["model"]


def tiny_siglip_only(**over) -> dict:
    m = tiny_hybrid(**over)
    m["sam"] = {"enabled": False}
    return m


def _cfg(model: dict):
    return config_from_dict({"model": model, "train": {"seq_len": 64}}).model


def _model(model: dict, seed: int = 0):
    return build_model(_cfg(model), seed=seed).eval()


def _randomise(model, seed: int = 0):
    """Random values everywhere (the init leaves zeros / ones in places, e.g. hd_alpha, norms, rel_pos)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# The tiny test towers are not the sizes DeepSeek-VL's builders make (export refuses them by default): these
# exports are read back by our own import and by timm / transformers modules built at the tiny sizes.
_export = functools.partial(export_deepseek_vl, allow_nonrelease=True)


def _assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k




TOKENS = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))

LLAMA_FIELDS = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "max_position_embeddings": 128, "tie_word_embeddings": False, "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}
