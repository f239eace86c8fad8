"""Export to / import from DeepSeek-VL's released layout (vlpretrain/checkpoint/deepseek_vl.py and
deepseek_vl_config.py): round trips, the tensors their modules need, mismatches, the release towers, the real
7B / 1.3B configs.

Tiny models only, no network: HF_HUB_OFFLINE=1; the real 7B / 1.3B layouts are checked on meta-device models.
"""
from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import timm
import torch
from export_helpers import (
    LLAMA_FIELDS,
    REPO,
    TOKENS,
    _assert_same_state,
    _cfg,
    _export,
    _model,
    _randomise,
    tiny_hybrid,
    tiny_siglip_only,
)
from safetensors.torch import load_file, save_file
from torch import nn

from vlpretrain.checkpoint.deepseek_vl import (
    export_deepseek_vl,
    import_deepseek_vl,
    load_deepseek_vl,
    to_deepseek_vl_state,
)
from vlpretrain.checkpoint.deepseek_vl_config import (
    HINT_KEY,
    check_release_towers,
    deepseek_vl_config,
    deepseek_vl_model_dict,
    model_config_from_dict,
)
from vlpretrain.checkpoint.hf_llama import export_hf_llama
from vlpretrain.checkpoint.pretrained import load_hf_llm, load_sam, load_siglip
from vlpretrain.config import load_config
from vlpretrain.errors import UserError
from vlpretrain.models.state_dict_adapter import DS_HIGH, DS_LOW, DS_SINGLE
from vlpretrain.models.vlm import build_model

transformers = pytest.importorskip("transformers")

HIGH, LOW, SINGLE = DS_HIGH, DS_LOW, DS_SINGLE


# ----------------------------------------------------------------------------------------------------------------
# DeepSeek-VL layout: round trips

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("make", [tiny_hybrid, tiny_siglip_only], ids=["hybrid", "siglip_only"])
def test_deepseek_vl_round_trip(tmp_path, make):
    model = _randomise(_model(make()), seed=3)
    cfg = model.cfg
    out = _export(model, cfg, tmp_path / "ds")
    config = json.loads((out / "config.json").read_text())
    weights = load_file(str(out / "model.safetensors"))

    # layout
    assert config["model_type"] == "multi_modality" and config["architectures"] == ["MultiModalityCausalLM"]
    low = LOW if cfg.sam.enabled else SINGLE
    assert low + "patch_embed.proj.weight" in weights and low + "blocks.1.mlp.fc2.bias" in weights
    assert "aligner.layers.1.weight" in weights if cfg.sam.enabled else "aligner.layers.2.weight" in weights
    assert "language_model.lm_head.weight" in weights
    assert "language_model.model.layers.0.self_attn.k_proj.weight" in weights
    pool = {k: v for k, v in weights.items() if k.startswith(low + "attn_pool.")}
    assert pool[low + "attn_pool.latent"].shape == (1, 1, 32)
    assert pool[low + "attn_pool.kv.weight"].shape == (64, 32)
    assert pool[low + "attn_pool.mlp.fc1.weight"].shape == (128, 32)
    assert all(not v.any() for k, v in pool.items() if not k.endswith("norm.weight"))
    if cfg.sam.enabled:
        assert HIGH + "blocks.0.mlp.lin1.weight" in weights and HIGH + "blocks.0.mlp.fc1.weight" not in weights
        for k in ("neck.3.bias", "neck_hd.0.weight", "downsamples.1.weight", "hd_alpha_downsamples",
                  "blocks.1.attn.rel_pos_h"):
            assert HIGH + k in weights, k
        assert torch.equal(weights["vision_model.high_layer_norm.weight"], torch.ones(32))
        assert torch.equal(weights["vision_model.low_layer_norm.bias"], torch.zeros(32))
    else:
        assert not any(k.startswith(("vision_model.vision_tower_high", "vision_model.high_layer_norm"))
                       for k in weights)

    # back to ours: same config, bit-identical state
    model_dict, state = import_deepseek_vl(out)
    assert model_config_from_dict(model_dict) == cfg
    _assert_same_state(state, model.state_dict())

    # and streamed into a built model
    fresh = _model(make(), seed=9)
    report = load_deepseek_vl(fresh, out)
    assert report["loaded"] == len(model.state_dict())
    assert all(k.startswith((low + "attn_pool.", "vision_model.high_layer_norm", "vision_model.low_layer_norm"))
               for k in report["ignored"])
    _assert_same_state(fresh.state_dict(), model.state_dict())


def test_export_from_our_weights_file(tmp_path):
    """Our weights file / checkpoint dir (checkpoint/weights.py) is read lazily and exports the same."""
    from vlpretrain.checkpoint.weights import save_checkpoint

    model = _randomise(_model(tiny_hybrid(**{"sam.hd_path": False})), seed=20)
    step_dir = save_checkpoint(model, tmp_path / "ckpt", step=7, meta={}, keep_last=1)
    out = _export(tmp_path / "ckpt", model.cfg, tmp_path / "ds")  # resolved via ``latest``
    _, state = import_deepseek_vl(out)
    _assert_same_state({k: v for k, v in state.items() if "neck_hd" not in k and "hd_alpha" not in k},
                       model.state_dict())
    hf = export_hf_llama(step_dir, model.cfg, tmp_path / "hf")
    fresh = _model(tiny_hybrid(), seed=21)
    load_hf_llm(fresh, hf)
    assert torch.equal(fresh.state_dict()["head.output.weight"], model.state_dict()["head.output.weight"])


def test_deepseek_vl_bf16_export(tmp_path):
    model = _randomise(_model(tiny_hybrid()), seed=4)
    out = _export(model, model.cfg, tmp_path / "ds", dtype=torch.bfloat16, shard_bytes=100_000)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["language_config"]["torch_dtype"] == "bfloat16"
    assert (out / "model.safetensors.index.json").is_file()
    _, state = import_deepseek_vl(out)
    for k, v in model.state_dict().items():
        assert state[k].dtype == torch.bfloat16 and torch.equal(state[k], v.to(torch.bfloat16)), k


def test_import_sharded_torch_bins_and_v5_rope_fields(tmp_path):
    """Checkpoints saved as ``pytorch_model-*.bin`` shards with an index, and a language_config written by
    transformers 5 (``rope_parameters`` instead of ``rope_theta``), import the same."""
    model = _randomise(_model(tiny_siglip_only()), seed=19)
    out = _export(model, model.cfg, tmp_path / "ds")
    weights = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    keys = sorted(weights)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: weights[k] for k in part}, out / name)
        weight_map.update({k: name for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((out / "config.json").read_text())
    lang = config["language_config"]
    lang.pop("rope_theta")
    lang.pop("rope_scaling")
    lang["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (out / "config.json").write_text(json.dumps(config))
    model_dict, state = import_deepseek_vl(out)
    assert model_config_from_dict(model_dict) == model.cfg
    _assert_same_state(state, model.state_dict())
    lang["rope_parameters"]["rope_theta"] = 500000.0
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_theta"):
        load_deepseek_vl(_model(tiny_siglip_only()), out)


def test_deepseek_vl_language_model_is_hf_llama(tmp_path):
    """The ``language_model.*`` part of the export is a LlamaForCausalLM built from ``language_config``."""
    model = _randomise(_model(tiny_hybrid()), seed=6)
    out = _export(model, model.cfg, tmp_path / "ds")
    config = json.loads((out / "config.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    lang = {k: v for k, v in config["language_config"].items() if k not in ("architectures", "torch_dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**lang)).eval()
    hf.load_state_dict({k[len("language_model."):]: v for k, v in weights.items()
                        if k.startswith("language_model.")}, strict=True)
    with torch.no_grad():
        assert (hf(TOKENS).logits - model(TOKENS)).abs().max().item() < 1e-5


def test_siglip_tower_loads_strictly_into_map_pooled_vit(tmp_path):
    """DeepSeek-VL builds its SigLIP as a timm-style VisionTransformer with ``global_pool="map"``: the exported
    low tower (with the zero attn_pool) loads strictly into one and computes our tower's features."""
    model = _randomise(_model(tiny_hybrid()), seed=7)
    out = _export(model, model.cfg, tmp_path / "ds")
    weights = load_file(str(out / "model.safetensors"))
    s = model.cfg.siglip
    vit = timm.create_model("vit_large_patch16_siglip_384", pretrained=False, num_classes=0, global_pool="map",
                            img_size=s.image_size, patch_size=s.patch_size, embed_dim=s.width, depth=s.depth,
                            num_heads=s.heads, mlp_ratio=s.mlp_ratio).eval()
    vit.load_state_dict({k[len(LOW):]: v for k, v in weights.items() if k.startswith(LOW)}, strict=True)
    x = torch.rand(2, 3, s.image_size, s.image_size)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), model.embed.vision.siglip.vit.forward_features(x))


def test_export_readable_by_pretrained_part_loaders(tmp_path):
    """The existing SAM / SigLIP importers (pretrained.py) read the exported towers back unchanged."""
    model = _randomise(_model(tiny_hybrid()), seed=8)
    out = _export(model, model.cfg, tmp_path / "ds")
    fresh = _model(tiny_hybrid(), seed=11)
    assert load_sam(fresh, out)["prefix"] == HIGH
    assert load_siglip(fresh, out)["prefix"] == LOW
    ref = model.state_dict()
    for k, v in fresh.state_dict().items():
        if k.startswith("embed.vision."):
            assert torch.equal(v, ref[k]), k


# ----------------------------------------------------------------------------------------------------------------
# Mismatches and the hd-path stub


@pytest.mark.parametrize("over, field", [
    ({"n_layers": 3}, "num_hidden_layers"),
    ({"n_kv_heads": 4}, "num_key_value_heads"),
    ({"siglip.depth": 3}, "model.siglip.depth"),
    ({"sam.neck_chans": 8}, "model.sam.neck_chans"),
    ({"sam.global_attn_indexes": [0]}, "model.sam.global_attn_indexes"),
    ({"sam.hd_path": False, "sam.global_attn_indexes": [1]}, None),  # alpha != 0: hd path must be on
])
def test_load_mismatch_names_field_and_leaves_model_untouched(tmp_path, over, field):
    src = _randomise(_model(tiny_hybrid()), seed=12)
    out = _export(src, src.cfg, tmp_path / "ds")
    target = _model(tiny_hybrid(**over), seed=13)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=field or "hd_path: true"):
        load_deepseek_vl(target, out)
    _assert_same_state(target.state_dict(), before)


def test_import_names_missing_and_unexpected_tensors(tmp_path):
    src = _randomise(_model(tiny_hybrid()), seed=18)
    out = _export(src, src.cfg, tmp_path / "ds")
    weights = load_file(str(out / "model.safetensors"))
    save_file({**weights, "vision_model.extra.weight": torch.zeros(1)}, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="no place in the model: vision_model.extra.weight"):
        import_deepseek_vl(out)
    weights.pop(LOW + "blocks.1.norm1.weight")
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 tensors: vision_model\.vision_tower_low\.vision_tower\.blocks\.1"):
        import_deepseek_vl(out)
    with pytest.raises(ValueError, match="missing 1 tensors"):
        load_deepseek_vl(_model(tiny_hybrid()), out)


def test_load_mismatch_sam_enabled(tmp_path):
    hybrid = _randomise(_model(tiny_hybrid()), seed=14)
    single = _randomise(_model(tiny_siglip_only()), seed=15)
    _export(hybrid, hybrid.cfg, tmp_path / "hybrid")
    _export(single, single.cfg, tmp_path / "single")
    with pytest.raises(ValueError, match="model.sam.enabled"):
        load_deepseek_vl(_model(tiny_siglip_only()), tmp_path / "hybrid")
    with pytest.raises(ValueError, match="model.sam.enabled"):
        load_deepseek_vl(_model(tiny_hybrid()), tmp_path / "single")


def test_sam_without_hd_path_exports_a_noop_stub(tmp_path):
    """Their SAM always owns neck_hd: ours without it exports a copy of the neck with alpha 0 (same outputs)."""
    model_dict = tiny_hybrid(**{"sam.hd_path": False})
    model = _randomise(_model(model_dict), seed=16)
    out = _export(model, model.cfg, tmp_path / "ds")
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights[HIGH + "hd_alpha_downsamples"], torch.zeros(1))
    assert torch.equal(weights[HIGH + "neck_hd.2.weight"], weights[HIGH + "neck.2.weight"])
    fresh = _model(model_dict, seed=17)
    report = load_deepseek_vl(fresh, out)
    assert HIGH + "hd_alpha_downsamples" in report["ignored"]
    _assert_same_state(fresh.state_dict(), model.state_dict())
    derived, state = import_deepseek_vl(out)  # as a checkpoint, it has the (no-op) hd path
    assert derived["sam"]["hd_path"] is True and float(state["embed.vision.sam.hd_alpha_downsamples"]) == 0.0


def test_unrepresentable_aligner_raises():
    cfg = _cfg(tiny_hybrid(**{"sam.downsample_channels": [24, 48]}))
    with pytest.raises(ValueError, match="input_dim"):
        deepseek_vl_config(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Refusing towers DeepSeek-VL's builders cannot make; the released 1.3B layout


def test_export_refuses_towers_their_builders_cannot_make(tmp_path):
    """Their code takes tower sizes from the model name: a tiny model is refused in one line (nothing written),
    the released 7B / 1.3B towers pass, and so does a SigLIP-only model at another input size."""
    model = _model(tiny_hybrid())
    with pytest.raises(UserError, match=r"model\.siglip\.patch_size = 8: .*siglip_large_patch16_384") as e:
        export_deepseek_vl(model, model.cfg, tmp_path / "ds")
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())
    for name in ("deepseek-vl-7b", "deepseek-vl-1.3b"):
        check_release_towers(_real(name))
    real = dataclasses.asdict(_real("deepseek-vl-7b"))
    real["sam"]["window_size"] = 16
    with pytest.raises(UserError, match=r"model\.sam\.window_size = 16: .*sam_b_downsample"):
        check_release_towers(model_config_from_dict(real))
    single = dataclasses.asdict(_real("deepseek-vl-1.3b"))
    single["siglip"]["image_size"] = 224  # their create_siglip_vit follows image_size
    check_release_towers(model_config_from_dict(single))


def test_siglip_only_export_follows_released_1_3b_layout(tmp_path):
    """SigLIP alone: no pixel_mean / pixel_std in the tower params, the processor normalises (with the model's
    SigLIP mean / std, which import reads back from preprocessor_config.json); older exports with them in the
    params, and released directories without a processor file, import too."""
    m = tiny_siglip_only(**{"siglip.mean": [0.25, 0.5, 0.75], "siglip.std": [0.2, 0.3, 0.4]})
    model = _randomise(_model(m), seed=40)
    out = _export(model, model.cfg, tmp_path / "ds")
    config = json.loads((out / "config.json").read_text())
    params = config["vision_config"]["params"]
    assert "pixel_mean" not in params and "pixel_std" not in params
    image = json.loads((out / "preprocessor_config.json").read_text())
    assert image["do_normalize"] is True
    assert (image["image_mean"], image["image_std"]) == ([0.25, 0.5, 0.75], [0.2, 0.3, 0.4])
    model_dict, state = import_deepseek_vl(out)
    assert model_config_from_dict(model_dict) == model.cfg
    _assert_same_state(state, model.state_dict())
    assert load_deepseek_vl(_model(m, seed=2), out)["loaded"] == len(state)

    def derived_norm() -> tuple[list, list]:
        d = import_deepseek_vl(out)[0]["siglip"]
        return d["mean"], d["std"]

    # the tower normalises (our older exports): the processor must not
    params.update(pixel_mean=[0.1, 0.2, 0.3], pixel_std=[0.5, 0.5, 0.5])
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="normalised twice"):
        import_deepseek_vl(out)
    image["do_normalize"] = False
    (out / "preprocessor_config.json").write_text(json.dumps(image))
    assert derived_norm() == ([0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    # neither normalises: the tower sees [0, 1] pixels
    del params["pixel_mean"], params["pixel_std"]
    (out / "config.json").write_text(json.dumps(config))
    assert derived_norm() == ([0.0] * 3, [1.0] * 3)
    # no processor file: SigLIP's own 0.5 / 0.5 (what the released processor uses)
    (out / "preprocessor_config.json").unlink()
    assert derived_norm() == ([0.5] * 3, [0.5] * 3)


# ----------------------------------------------------------------------------------------------------------------
# LayerNorm eps as DeepSeek-VL's modules (sam.py: partial(nn.LayerNorm, eps=1e-6) for the blocks, LayerNorm2d
# eps 1e-6 in the necks; siglip_vit.py: partial(nn.LayerNorm, eps=1e-6)); the LLM: language_config.rms_norm_eps


@pytest.mark.parametrize("name", ["deepseek-vl-7b", "deepseek-vl-1.3b", "tiny"])
def test_every_norm_eps_matches_the_official_modules(name):
    from timm.layers import LayerNorm2d

    from vlpretrain.models.llm import RMSNorm

    if name == "tiny":
        import yaml

        cfg = _cfg(yaml.safe_load((REPO / "configs" / "tiny" / "model.yaml").read_text())["model"])
    else:
        cfg = _real(name)
    model = build_model(cfg, "meta")
    seen: dict[str, int] = {}
    for n, mod in model.named_modules():
        kind = type(mod).__name__
        if "norm" not in kind.lower():
            continue
        assert isinstance(mod, (nn.LayerNorm, LayerNorm2d, RMSNorm)), f"{n}: unchecked norm type {kind}"
        want = cfg.norm_eps if isinstance(mod, RMSNorm) else 1e-6
        assert mod.eps == want, f"{n} ({kind}): eps {mod.eps}, DeepSeek-VL's module has {want}"
        seen[kind] = seen.get(kind, 0) + 1
    sam_blocks = cfg.sam.depth if cfg.sam.enabled else 0
    necks = (4 if cfg.sam.hd_path else 2) if cfg.sam.enabled else 0
    assert seen == {"LayerNorm": 2 * cfg.siglip.depth + 1 + 2 * sam_blocks, "RMSNorm": 2 * cfg.n_layers + 1,
                    **({"LayerNorm2d": necks} if necks else {})}


# ----------------------------------------------------------------------------------------------------------------
# The real configs (meta device: no weights)


def _real(name: str):
    return load_config(REPO / "configs" / name / "model.yaml").model


def test_deepseek_vl_7b_config_json():
    cfg = _real("deepseek-vl-7b")
    c = deepseek_vl_config(cfg, torch.bfloat16)
    assert c["model_type"] == "multi_modality" and c["architectures"] == ["MultiModalityCausalLM"]
    assert c["torch_dtype"] == "bfloat16"
    v = c["vision_config"]
    assert v["cls"] == "HybridVisionTower" and v["model_type"] == "vision"
    p = v["params"]
    assert p["concat_type"] == "tuple"
    assert p["high_res_cfg"] == {
        "model_name": "sam_b_downsample", "image_size": 1024, "output_dim": 1024,
        "pixel_mean": [0.48145466, 0.4578275, 0.40821073], "pixel_std": [0.26862954, 0.26130258, 0.27577711],
        "select_feature": "same", "select_layer": -1, "ckpt_path": ""}
    assert p["low_res_cfg"] == {
        "model_name": "siglip_large_patch16_384", "image_size": 384, "output_dim": 1024,
        "pixel_mean": [0.5, 0.5, 0.5], "pixel_std": [0.5, 0.5, 0.5], "select_feature": "same",
        "select_layer": -1, "ckpt_path": ""}
    assert c["aligner_config"] == {"cls": "MlpProjector", "model_type": "aligner", "params": {
        "projector_type": "low_high_hybrid_split_mlp_gelu", "input_dim": 1024, "n_embed": 4096, "depth": 2}}
    lang = c["language_config"]
    want = {**LLAMA_FIELDS, "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}
    for k, val in want.items():
        assert lang[k] == val, k
    json.dumps(c)  # serialisable


def test_deepseek_vl_1_3b_config_json():
    c = deepseek_vl_config(_real("deepseek-vl-1.3b"))
    assert c["vision_config"]["cls"] == "CLIPVisionTower"
    assert c["vision_config"]["params"]["model_name"] == "siglip_large_patch16_384"
    assert c["aligner_config"]["params"] == {"projector_type": "mlp_gelu", "input_dim": 1024, "n_embed": 2048,
                                             "depth": 2}
    assert c["language_config"]["hidden_size"] == 2048 and c["language_config"]["intermediate_size"] == 5504
    # as the released 1.3B config: the tower does not normalise (its processor does)
    assert "pixel_mean" not in c["vision_config"]["params"] and "pixel_std" not in c["vision_config"]["params"]


@pytest.mark.parametrize("name", ["deepseek-vl-7b", "deepseek-vl-1.3b"])
def test_real_layout_derives_our_config_without_hint(name):
    """A released checkpoint has no ``vlpretrain_model`` entry: the model section comes from the DeepSeek-VL
    fields and the tensor shapes alone (checked on the meta-device layout of the real model)."""
    cfg = _real(name)
    model = build_model(cfg, "meta")
    state = to_deepseek_vl_state(model, cfg)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    config = deepseek_vl_config(cfg, "bfloat16")
    config.pop(HINT_KEY)
    derived = dataclasses.asdict(model_config_from_dict(deepseek_vl_model_dict(config, shapes)))
    want = dataclasses.asdict(cfg)
    assert {k: v for k, v in derived.items() if k != "name"} == {k: v for k, v in want.items() if k != "name"}
    if name == "deepseek-vl-7b":
        # the released language_config lists a few fields only: LlamaConfig defaults fill the rest
        config["language_config"] = {"max_position_embeddings": 16384, "model_type": "llama",
                                     "num_hidden_layers": 30, "torch_dtype": "bfloat16", "vocab_size": 102400}
        sparse = deepseek_vl_model_dict(config, shapes)
        assert (sparse["dim"], sparse["ffn_dim"], sparse["n_heads"], sparse["max_seq_len"]) == (4096, 11008, 32,
                                                                                              16384)
        config["language_config"]["intermediate_size"] = 4096
        with pytest.raises(ValueError, match="intermediate_size"):
            deepseek_vl_model_dict(config, shapes)
