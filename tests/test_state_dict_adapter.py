"""The pure key maps of vlpretrain/models/state_dict_adapter.py: every parameter of a model is mapped, and our
names -> a checkpoint format's -> ours (through the import maps) is the identity. Meta-device models only.
"""
from __future__ import annotations

import pytest
from export_helpers import REPO, _cfg, tiny_hybrid, tiny_siglip_only

from vlpretrain.config import load_config
from vlpretrain.models.state_dict_adapter import (
    ADAPTOR_PREFIX,
    DS_ALIGNER,
    DS_HIGH,
    DS_LLM,
    DS_LOW,
    DS_SINGLE,
    SAM_PREFIX,
    SIGLIP_PREFIX,
    deepseek_vl_key_map,
    hf_llama_export_map,
    hf_llama_key_map,
    param_shapes,
    sam_key_to_ours,
    sam_key_to_theirs,
    siglip_key_to_ours,
)
from vlpretrain.models.vlm import build_model

CONFIGS = {
    "hybrid": lambda: _cfg(tiny_hybrid()),
    "hybrid_no_hd": lambda: _cfg(tiny_hybrid(**{"sam.hd_path": False})),
    "siglip_only": lambda: _cfg(tiny_siglip_only()),
    "deepseek-vl-7b": lambda: load_config(REPO / "configs" / "deepseek-vl-7b" / "model.yaml").model,
    "deepseek-vl-1.3b": lambda: load_config(REPO / "configs" / "deepseek-vl-1.3b" / "model.yaml").model,
}


def _ours_from_deepseek_vl(theirs: str, cfg) -> str:
    """A DeepSeek-VL name -> ours, through the import maps only."""
    low = DS_LOW if cfg.sam.enabled else DS_SINGLE
    if theirs.startswith(DS_LLM):
        return hf_llama_key_map(cfg.n_layers)[theirs[len(DS_LLM):]]
    if theirs.startswith(DS_ALIGNER):
        return ADAPTOR_PREFIX + theirs[len(DS_ALIGNER):]
    if theirs.startswith(DS_HIGH):
        return sam_key_to_ours(theirs[len(DS_HIGH):])
    assert theirs.startswith(low), theirs
    ours = siglip_key_to_ours(theirs[len(low):])
    assert ours is not None, theirs
    return ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_llama_maps_are_inverse_and_cover_the_decoder(name):
    cfg = CONFIGS[name]()
    keys = set(build_model(cfg, "meta").state_dict())
    to_hf, from_hf = hf_llama_export_map(cfg.n_layers), hf_llama_key_map(cfg.n_layers)
    decoder = {k for k in keys if k.startswith(("layers.", "head.", "embed.tok_embeddings."))}
    assert set(to_hf) == decoder  # every decoder parameter, nothing else
    assert len(set(to_hf.values())) == len(to_hf) == len(from_hf)
    assert {from_hf[to_hf[k]] for k in decoder} == decoder and all(from_hf[to_hf[k]] == k for k in decoder)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_deepseek_vl_map_round_trips_every_parameter(name):
    cfg = CONFIGS[name]()
    keys = list(build_model(cfg, "meta").state_dict())
    to_theirs = deepseek_vl_key_map(cfg)
    assert set(to_theirs) == set(keys) == set(param_shapes(cfg))
    assert len(set(to_theirs.values())) == len(keys)  # no two of ours on one of theirs
    assert all(_ours_from_deepseek_vl(t, cfg) == k for k, t in to_theirs.items())
    assert deepseek_vl_key_map(cfg, keys[:3]) == {k: to_theirs[k] for k in keys[:3]}


def test_names_of_each_scheme():
    assert sam_key_to_theirs(SAM_PREFIX + "vit.blocks.0.mlp.fc1.weight") == "blocks.0.mlp.lin1.weight"
    assert sam_key_to_theirs(SAM_PREFIX + "hd_alpha_downsamples") == "hd_alpha_downsamples"
    assert sam_key_to_ours("neck_hd.0.weight") == SAM_PREFIX + "neck_hd.0.weight"
    assert siglip_key_to_ours("attn_pool.latent") is None and siglip_key_to_ours("head.weight") is None
    assert siglip_key_to_ours("blocks.0.norm1.weight") == SIGLIP_PREFIX + "blocks.0.norm1.weight"
    cfg = _cfg(tiny_hybrid())
    with pytest.raises(ValueError, match="no place in the DeepSeek-VL layout"):
        deepseek_vl_key_map(cfg, ["embed.unknown.weight"])


def test_param_shapes_is_the_meta_model_and_a_copy():
    cfg = _cfg(tiny_hybrid())
    shapes = param_shapes(cfg)
    assert shapes == {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}
    shapes.clear()
    assert param_shapes(cfg)
