"""Export to HF LLaMA / DeepSeek-VL layouts and import DeepSeek-VL checkpoints (vlpretrain/checkpoint/hf_llama.py, deepseek_vl*.py).

Tiny models only, no network: HF_HUB_OFFLINE=1; the real 7B / 1.3B layouts are checked on meta-device models.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import timm
import torch
from safetensors import safe_open
from torch import nn
from safetensors.torch import load_file, save_file

from vlpretrain.checkpoint import deepseek_vl_config as interop_config
from vlpretrain.checkpoint import deepseek_vl_processor as interop_processor
from vlpretrain.checkpoint.deepseek_vl import (
    export_deepseek_vl,
    import_deepseek_vl,
    load_deepseek_vl,
    to_deepseek_vl_state,
)
from vlpretrain.checkpoint.deepseek_vl_config import (
    deepseek_vl_config,
    deepseek_vl_model_dict,
    model_config_from_dict,
)
from vlpretrain.checkpoint.hf_llama import export_hf_llama
from vlpretrain.checkpoint.pretrained import load_hf_llm, load_sam, load_siglip
from vlpretrain.config import config_from_dict, load_config
from vlpretrain.models import state_dict_adapter
from vlpretrain.models.vlm import build_model

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from equivalence_worker import tiny_hybrid as worker_tiny_hybrid  # noqa: E402

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
IMAGE_ID = 2
HIGH, LOW, SINGLE = state_dict_adapter.DS_HIGH, state_dict_adapter.DS_LOW, state_dict_adapter.DS_SINGLE


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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TOKENS = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------------
# HF LLaMA


LLAMA_FIELDS = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "max_position_embeddings": 128, "tie_word_embeddings": False, "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}


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


# ----------------------------------------------------------------------------------------------------------------
# DeepSeek-VL layout: round trips


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
        interop_config.check_release_towers(_real(name))
    real = dataclasses.asdict(_real("deepseek-vl-7b"))
    real["sam"]["window_size"] = 16
    with pytest.raises(UserError, match=r"model\.sam\.window_size = 16: .*sam_b_downsample"):
        interop_config.check_release_towers(model_config_from_dict(real))
    single = dataclasses.asdict(_real("deepseek-vl-1.3b"))
    single["siglip"]["image_size"] = 224  # their create_siglip_vit follows image_size
    interop_config.check_release_towers(model_config_from_dict(single))


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
    config.pop(interop_config.HINT_KEY)
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


# ----------------------------------------------------------------------------------------------------------------
# Processor and tokenizer files (what DeepSeek-VL's VLChatProcessor.from_pretrained reads)
#
# The official deepseek_vl package is not vendored and needs transformers 4.x (it fails to import on 5.x, which the
# test env has), so the files are checked here against what its code reads: VLMImageProcessor's and
# VLChatProcessor's __init__ arguments (deepseek_vl/models/{image_processing,processing}_vlm.py), a tokenizer that
# transformers loads with BOS first, as their ``tokenizer.encode`` expects. test_official_processor_opens_export runs
# the official processor itself when VLP_DEEPSEEK_VL_PYTHONPATH points at a transformers 4.x + deepseek_vl tree.

from vlpretrain.data.preprocess import background_color, load_image, preprocess_image  # noqa: E402
from vlpretrain.data.tokenizer import BOS, EOS, PAD, TextTokenizer  # noqa: E402
from vlpretrain.errors import UserError  # noqa: E402

# __init__ parameters of their VLMImageProcessor / VLChatProcessor (+ what transformers' mixins pop or keep)
OFFICIAL_IMAGE_PROCESSOR_ARGS = {"image_size", "min_size", "image_mean", "image_std", "rescale_factor",
                                 "do_normalize", "image_processor_type", "processor_class", "background_color"}
OFFICIAL_PROCESSOR_ARGS = {"image_tag", "num_image_tokens", "add_special_token", "sft_format", "mask_prompt",
                           "ignore_id", "processor_class"}
EXPORT_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
PROMPT = "User: <image_placeholder>What colour is the circle?\n\nAssistant: It is red, héllo  world."


def _with_demo_vocab(make):
    return make(vocab_size=2048)  # the demo tokenizer's size; its <image_placeholder> is id 2 = IMAGE_ID


@pytest.mark.parametrize("make", [tiny_hybrid, tiny_siglip_only], ids=["hybrid", "siglip_only"])
def test_deepseek_vl_export_has_processor_and_tokenizer(tmp_path, demo_dir, make):
    model = _randomise(_model(_with_demo_vocab(make)), seed=30)
    cfg = model.cfg
    tok_file = demo_dir / "tokenizer.json"
    out = _export(model, cfg, tmp_path / "ds", tokenizer=tok_file)
    assert {p.name for p in out.iterdir()} == EXPORT_FILES

    image = json.loads((out / "preprocessor_config.json").read_text())
    assert set(image) <= OFFICIAL_IMAGE_PROCESSOR_ARGS and image["image_processor_type"] == "VLMImageProcessor"
    assert image["image_size"] == cfg.image_size  # SAM's input for the hybrid tower, SigLIP's alone
    mean = cfg.sam.mean if cfg.sam.enabled else cfg.siglip.mean
    assert image["image_mean"] == list(mean) and tuple(image["background_color"]) == background_color(mean)
    # images are normalised once: by their towers in the hybrid (pixel_mean / pixel_std in the vision config), by
    # the processor for SigLIP alone (as the released 1.3B)
    params = json.loads((out / "config.json").read_text())["vision_config"]["params"]
    if cfg.sam.enabled:
        assert "pixel_mean" in params["low_res_cfg"] and image["do_normalize"] is False
    else:
        assert "pixel_mean" not in params and "pixel_std" not in params and image["do_normalize"] is True
        assert image["image_std"] == list(cfg.siglip.std)
    proc = json.loads((out / "processor_config.json").read_text())
    assert set(proc) <= OFFICIAL_PROCESSOR_ARGS
    assert proc["image_tag"] == "<image_placeholder>" and proc["num_image_tokens"] == cfg.image_tokens

    # the tokenizer: transformers loads it with DeepSeek-LLM's specials and BOS first, ids as ours
    ours = TextTokenizer(tok_file)
    for cls in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(out))
        assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS, EOS, PAD)
        assert hf.convert_tokens_to_ids("<image_placeholder>") == cfg.image_token_id
        assert hf.encode(PROMPT) == [ours.bos_id] + ours.encode(PROMPT)
        assert hf.decode(ours.encode(PROMPT)) == PROMPT
    # merges as "a b" strings, as DeepSeek-LLM's file: the tokenizers < 0.19 of their transformers 4.x cannot
    # read the [a, b] pairs that tokenizers >= 0.20 writes
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizerFast" and tok_cfg["add_bos_token"] is True

    # import reads it back: our tokenizer file, same ids, image token id from the tokenizer
    model_dict, state = import_deepseek_vl(out, tokenizer_out=tmp_path / "imported" / "tokenizer.json")
    back = TextTokenizer(tmp_path / "imported" / "tokenizer.json")
    assert back.encode(PROMPT) == ours.encode(PROMPT) and back.vocab_size == ours.vocab_size
    assert (back.bos_id, back.eos_id, back.image_id, back.pad_id) == (ours.bos_id, ours.eos_id, ours.image_id,
                                                                      ours.pad_id)
    assert model_dict["image_token_id"] == ours.image_id
    assert model_config_from_dict(model_dict) == cfg
    _assert_same_state(state, model.state_dict())


def test_export_refuses_a_tokenizer_that_does_not_fit(tmp_path, demo_dir):
    model = _model(_with_demo_vocab(tiny_hybrid)).eval()
    bad_id = _model({**_with_demo_vocab(tiny_hybrid), "image_token_id": 7})
    with pytest.raises(UserError, match="image_token_id"):
        _export(bad_id, bad_id.cfg, tmp_path / "a", tokenizer=demo_dir / "tokenizer.json")
    small = _model(tiny_hybrid())  # vocab 256 < the tokenizer's 2048
    with pytest.raises(UserError, match="vocab_size"):
        _export(small, small.cfg, tmp_path / "b", tokenizer=demo_dir / "tokenizer.json")
    with pytest.raises(FileNotFoundError):
        _export(model, model.cfg, tmp_path / "c", tokenizer=tmp_path / "missing.json")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def _released_style_tokenizer(d: Path, bos=BOS) -> None:
    """A tokenizer dir as DeepSeek-LLM ships it: BOS / EOS as AddedToken dicts in tokenizer_config.json, no
    <image_placeholder> and no <pad>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {BOS: 0, EOS: 1, **{c: i + 2 for i, c in enumerate("abcdefghij ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.add_special_tokens([BOS, EOS])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": bos, "special": True},
        "eos_token": {"__type": "AddedToken", "content": EOS, "special": True}, "pad_token": None}))


def test_import_released_style_tokenizer_adds_image_tag_and_pad(tmp_path):
    _released_style_tokenizer(tmp_path / "src")
    report = interop_processor.import_deepseek_vl_tokenizer(tmp_path / "src", tmp_path / "out" / "tokenizer.json")
    assert report["added"] == ["<image_placeholder>", "<pad>"]
    tok = TextTokenizer(tmp_path / "out" / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.image_id, tok.pad_id) == (0, 1, 13, 14) == (0, 1, report["image_token_id"], 14)
    assert tok.encode("a<image_placeholder>b") == [2, 13, 3]
    _released_style_tokenizer(tmp_path / "other", bos="<s>")
    with pytest.raises(UserError, match="bos_token"):
        interop_processor.import_deepseek_vl_tokenizer(tmp_path / "other", tmp_path / "out2" / "tokenizer.json")


@pytest.mark.parametrize("file, field, value, match", [
    ("processor_config.json", "num_image_tokens", 576, "num_image_tokens"),
    ("preprocessor_config.json", "image_size", 1024, "image_size"),
    ("preprocessor_config.json", "do_normalize", True, "normalised twice"),
])
def test_processor_files_checked_on_import(tmp_path, file, field, value, match):
    model = _randomise(_model(tiny_hybrid()), seed=31)
    out = _export(model, model.cfg, tmp_path / "ds")
    d = json.loads((out / file).read_text())
    d[field] = value
    (out / file).write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        import_deepseek_vl(out)
    with pytest.raises(ValueError, match=match):
        load_deepseek_vl(_model(tiny_hybrid()), out)


OFFICIAL_SCRIPT = r"""
import json, sys
import numpy as np
from PIL import Image
from deepseek_vl.models import VLChatProcessor
proc = VLChatProcessor.from_pretrained(sys.argv[1])
conv = [{"role": "User", "content": "<image_placeholder>What colour is the circle?", "images": [sys.argv[2]]},
        {"role": "Assistant", "content": ""}]
out = proc(conversations=conv, images=[Image.open(sys.argv[2]).convert("RGB")], force_batchify=True)
print(json.dumps({"sft_format": out.sft_format[0], "input_ids": out.input_ids[0].tolist(),
                  "pixel_values": out.pixel_values[0, 0].tolist(), "image_id": proc.image_id,
                  "images_seq_mask": int(out.images_seq_mask.sum()), "tokenizer": type(proc.tokenizer).__name__}))
"""


@pytest.mark.skipif(not os.environ.get("VLP_DEEPSEEK_VL_PYTHONPATH"),
                    reason="needs the official deepseek_vl code + transformers 4.x (VLP_DEEPSEEK_VL_PYTHONPATH)")
@pytest.mark.parametrize("make", [tiny_hybrid, tiny_siglip_only], ids=["hybrid", "siglip_only"])
def test_official_processor_opens_export(tmp_path, demo_dir, make):
    """Their VLChatProcessor.from_pretrained(export) in a subprocess (its own transformers 4.x): the token ids
    and pixel values it gives equal our data path's (tokenizer + data/preprocess.py)."""
    import subprocess

    import numpy as np
    from PIL import Image

    model = _model(_with_demo_vocab(make))
    cfg = model.cfg
    out = _export(model, cfg, tmp_path / "ds", tokenizer=demo_dir / "tokenizer.json")
    rng = np.random.default_rng(0)
    img = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(img)
    env = {**os.environ, "PYTHONPATH": os.environ["VLP_DEEPSEEK_VL_PYTHONPATH"]}
    res = subprocess.run([sys.executable, "-c", OFFICIAL_SCRIPT, str(out), str(img)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    tok = TextTokenizer(demo_dir / "tokenizer.json")
    assert got["sft_format"].startswith("You are a helpful language and vision assistant.")  # their default
    assert got["sft_format"].endswith("\n\nUser: <image_placeholder>What colour is the circle?\n\nAssistant:")
    ids = [tok.bos_id]
    for t in tok.encode(got["sft_format"]):
        ids += [t] * (cfg.image_tokens if t == tok.image_id else 1)
    assert got["input_ids"] == ids and got["image_id"] == cfg.image_token_id
    assert got["images_seq_mask"] == cfg.image_tokens
    mean = cfg.sam.mean if cfg.sam.enabled else cfg.siglip.mean
    ours = preprocess_image(load_image(img), cfg.image_size, mean).float()
    theirs = torch.tensor(got["pixel_values"])
    tol = 2 / 255 + 1e-6
    if not cfg.sam.enabled:  # their processor normalises for SigLIP alone (the released 1.3B), our tower does
        ours = (ours - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(cfg.siglip.std).view(3, 1, 1)
        tol /= min(cfg.siglip.std)
    assert theirs.shape == ours.shape and (theirs - ours).abs().max().item() <= tol
