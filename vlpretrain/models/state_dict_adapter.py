"""Our parameter names <-> the names of the checkpoint formats we read and write: pure key maps (no file I/O, no
tensors), kept beside the modules whose names they map, one map per naming scheme.

    hf_llama_key_map(n_layers)       HF ``LlamaForCausalLM`` name -> ours (embeddings, blocks, final norm, head)
    hf_llama_export_map(n_layers)    ours -> HF: the inverse
    siglip_key_to_ours(k)            timm ViT (SigLIP) name, tower prefix stripped -> ours; None: not loaded
    sam_key_to_ours(k)               segment-anything / timm samvit / DeepSeek-VL SAM name, prefix stripped -> ours
    sam_key_to_theirs(k)             ours -> that name: the inverse, checked against ``sam_key_to_ours``
    deepseek_vl_key_map(cfg, keys)   ours -> DeepSeek-VL release name, for every parameter
    param_shapes(cfg)                our parameter names and shapes for ``cfg`` (a meta-device model; cached)

The import maps (theirs -> ours) are the reference: every export map is their inverse, checked key by key. q / k
of the decoder map unpermuted (ours and HF LLaMA both use rotate-half rotary embeddings).

Prefixes: ours (``SIGLIP_PREFIX``, ``SAM_PREFIX``, ``SAM_VIT_PREFIX``, ``ADAPTOR_PREFIX``) and DeepSeek-VL's
(``DS_HIGH`` SAM tower, ``DS_LOW`` SigLIP tower of the hybrid, ``DS_SINGLE`` SigLIP alone, ``DS_LAYER_NORMS``,
``DS_LLM``; ``../shared/DEEPSEEK_VL_FORMAT.md``).
"""
from __future__ import annotations

import dataclasses
import functools
import json

from vlpretrain.config import ModelConfig, build_dataclass

# ours
SIGLIP_PREFIX = "embed.vision.siglip.vit."
SAM_PREFIX = "embed.vision.sam."
SAM_VIT_PREFIX = SAM_PREFIX + "vit."
ADAPTOR_PREFIX = "embed.adaptor."

# DeepSeek-VL's released checkpoints (HybridVisionTower: low = SigLIP, high = SAM)
DS_HIGH = "vision_model.vision_tower_high.vision_tower."
DS_LOW = "vision_model.vision_tower_low.vision_tower."
DS_SINGLE = "vision_model.vision_tower."  # CLIPVisionTower (1.3B, SigLIP only)
DS_LAYER_NORMS = ("vision_model.high_layer_norm.", "vision_model.low_layer_norm.")
DS_LLM = "language_model."
DS_ALIGNER = "aligner."

# where the pretrained-part loaders look first for a tower (segment-anything: ``image_encoder.``)
DEEPSEEK_VL_SIGLIP_PREFIXES = (DS_LOW, DS_SINGLE)
DEEPSEEK_VL_SAM_PREFIXES = (DS_HIGH, "image_encoder.")

# keys of DeepSeek-VL's SAM tower that live next to ``vit`` in ours (the tail after the neck)
_SAM_TAIL = ("neck_hd.", "downsamples.", "hd_alpha_downsamples")
# SigLIP's pooling head / classifier: unused (we take forward_features)
_SIGLIP_DROP = ("attn_pool.", "head.", "fc_norm.")


# ----------------------------------------------------------------------------------------------------------------
# HF LLaMA


def hf_llama_key_map(n_layers: int) -> dict[str, str]:
    """HF ``LlamaForCausalLM`` parameter name -> ours (q/k load unpermuted: both use rotate-half rotary)."""
    m = {"model.embed_tokens.weight": "embed.tok_embeddings.weight",
         "model.norm.weight": "head.norm.weight",
         "lm_head.weight": "head.output.weight"}
    per_layer = {"input_layernorm": "attention_norm",
                 "self_attn.q_proj": "attention.wq",
                 "self_attn.k_proj": "attention.wk",
                 "self_attn.v_proj": "attention.wv",
                 "self_attn.o_proj": "attention.wo",
                 "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "feed_forward.w1",
                 "mlp.up_proj": "feed_forward.w3",
                 "mlp.down_proj": "feed_forward.w2"}
    for i in range(n_layers):
        for hf, ours in per_layer.items():
            m[f"model.layers.{i}.{hf}.weight"] = f"layers.{i}.{ours}.weight"
    return m


def hf_llama_export_map(n_layers: int) -> dict[str, str]:
    """Our decoder parameter name -> HF ``LlamaForCausalLM``'s (the inverse of ``hf_llama_key_map``)."""
    return {ours: hf for hf, ours in hf_llama_key_map(n_layers).items()}


# ----------------------------------------------------------------------------------------------------------------
# Vision towers: timm ViT (SigLIP), segment-anything SAM


def siglip_key_to_ours(k: str) -> str | None:
    """timm ViT (SigLIP) name (prefix stripped) -> ours; None for the pooling head / classifier (not loaded)."""
    return None if k.startswith(_SIGLIP_DROP) else SIGLIP_PREFIX + k


def sam_key_to_ours(k: str) -> str:
    """segment-anything / DeepSeek-VL SAM encoder name (prefix stripped) -> ours."""
    if k.startswith(_SAM_TAIL):
        return SAM_PREFIX + k
    return SAM_VIT_PREFIX + k.replace(".mlp.lin1.", ".mlp.fc1.").replace(".mlp.lin2.", ".mlp.fc2.")


def sam_key_to_theirs(k: str) -> str:
    """Our SAM parameter name (under ``SAM_PREFIX``) -> the segment-anything / DeepSeek-VL name, prefix stripped."""
    tail = k[len(SAM_VIT_PREFIX):] if k.startswith(SAM_VIT_PREFIX) else k[len(SAM_PREFIX):]
    tail = tail.replace(".mlp.fc1.", ".mlp.lin1.").replace(".mlp.fc2.", ".mlp.lin2.")
    if sam_key_to_ours(tail) != k:  # the import map is the reference
        raise AssertionError(f"SAM key {k} does not round-trip through sam_key_to_ours ({tail})")
    return tail


# ----------------------------------------------------------------------------------------------------------------
# DeepSeek-VL release layout


def deepseek_vl_key_map(cfg: ModelConfig, our_keys: list[str] | None = None) -> dict[str, str]:
    """Our name -> DeepSeek-VL name, for every parameter of a model built from ``cfg`` (or for ``our_keys``)."""
    keys = list(our_keys) if our_keys is not None else list(param_shapes(cfg))
    llm = hf_llama_export_map(cfg.n_layers)
    low = DS_LOW if cfg.sam.enabled else DS_SINGLE
    out: dict[str, str] = {}
    for k in keys:
        if k in llm:
            theirs = DS_LLM + llm[k]
        elif k.startswith(ADAPTOR_PREFIX):
            theirs = DS_ALIGNER + k[len(ADAPTOR_PREFIX):]
        elif k.startswith(SIGLIP_PREFIX):
            theirs = low + k[len(SIGLIP_PREFIX):]
        elif k.startswith(SAM_PREFIX):
            theirs = DS_HIGH + sam_key_to_theirs(k)
        else:
            raise ValueError(f"parameter {k} has no place in the DeepSeek-VL layout")
        out[k] = theirs
    return out


# ----------------------------------------------------------------------------------------------------------------
# Our names and shapes


@functools.lru_cache(maxsize=8)
def _shapes_for(cfg_json: str) -> dict[str, tuple[int, ...]]:
    from vlpretrain.models.vlm import build_model

    cfg = build_dataclass(ModelConfig, json.loads(cfg_json))
    return {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``cfg`` (from a meta-device model: nothing is allocated; cached)."""
    return dict(_shapes_for(json.dumps(dataclasses.asdict(cfg), sort_keys=True)))
