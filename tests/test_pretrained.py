"""Loading pretrained parts (HF LLaMA, timm SigLIP, segment-anything / DeepSeek-VL SAM) into DeepSeekVL.

Every test builds its own tiny checkpoint: no network, no downloads.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from vlpretrain.checkpoint.pretrained import (
    load_hf_llm,
    load_pretrained_parts,
    load_sam,
    load_siglip,
)
from vlpretrain.config import config_from_dict
from vlpretrain.models.state_dict_adapter import hf_llama_key_map
from vlpretrain.models.vlm import build_model

transformers = pytest.importorskip("transformers")

VOCAB, IMAGE_TOKEN = 256, 255
MODEL = {
    "name": "tiny-test",
    "vocab_size": VOCAB, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 172,
    "norm_eps": 1.0e-6, "rope_theta": 10000.0, "max_seq_len": 128, "image_token_id": IMAGE_TOKEN,
    # the vision side of configs/tiny/model.yaml
    "siglip": {"image_size": 48, "patch_size": 8, "width": 96, "depth": 3, "heads": 4},
    "sam": {"enabled": True, "image_size": 128, "patch_size": 8, "width": 64, "depth": 4, "heads": 4,
            "window_size": 6, "global_attn_indexes": [1, 3], "neck_chans": 32, "interp_size": 24,
            "downsample_channels": [64, 96], "hd_path": True},
}
SAM_DS = "vision_model.vision_tower_high.vision_tower."
SIGLIP_DS = "vision_model.vision_tower_low.vision_tower."


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**overrides):
    model = {**MODEL, **overrides}
    return config_from_dict({"model": model, "train": {"seq_len": 64}}).model


def _model(seed: int = 0, **overrides):
    return build_model(_cfg(**overrides), seed=seed).eval()


# ----------------------------------------------------------------------------------------------------------------
# LLM


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=172, rms_norm_eps=1e-6, rope_theta=10000.0,
                         tie_word_embeddings=False, max_position_embeddings=128)
    torch.manual_seed(1234)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm mix-up cannot pass
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("hf_llama")
    single, sharded = root / "single", root / "sharded"
    hf.save_pretrained(single, safe_serialization=True)
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    return hf, single, sharded


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, IMAGE_TOKEN, (2, 24), generator=g)  # no image placeholder


def _max_logits_diff(model, hf) -> float:
    tokens = _tokens()
    with torch.no_grad():
        ours = model(tokens)
        ref = hf(input_ids=tokens).logits
    assert ours.shape == ref.shape == (2, 24, VOCAB)
    return (ours.float() - ref.float()).abs().max().item()


def test_hf_llm_logits_match(hf_llama):
    hf, single, _ = hf_llama
    model = _model()
    report = load_hf_llm(model, single)
    assert report["loaded"] == len(hf_llama_key_map(2)) == 3 + 2 * 9
    assert report["skipped"] == [] and report["ignored"] == []
    diff = _max_logits_diff(model, hf)
    print(f"max |logits - HF logits| = {diff:.3e}")
    assert diff < 1e-5


def test_hf_llm_sharded_matches_single(hf_llama):
    hf, single, sharded = hf_llama
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    a, b = _model(seed=1), _model(seed=2)
    load_hf_llm(a, single)
    load_hf_llm(b, sharded)
    sa, sb = a.state_dict(), b.state_dict()
    for ours in hf_llama_key_map(2).values():
        assert torch.equal(sa[ours], sb[ours]), ours
    assert _max_logits_diff(b, hf) < 1e-5


def test_hf_llm_gqa_mapping_unpermuted(hf_llama):
    hf, single, _ = hf_llama
    model = _model()
    load_hf_llm(model, single)
    sd, ref = model.state_dict(), hf.state_dict()
    for hf_key, ours in hf_llama_key_map(2).items():
        assert torch.equal(sd[ours], ref[hf_key]), hf_key
    assert sd["layers.0.attention.wk.weight"].shape == (2 * 16, 64)


def test_hf_llm_casts_to_model_dtype(hf_llama):
    hf, single, _ = hf_llama
    model = _model().to(torch.bfloat16)
    load_hf_llm(model, single)
    w = model.state_dict()["layers.1.feed_forward.w2.weight"]
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, hf.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))


def test_hf_llm_pipeline_stage_skips_parts_it_does_not_own(hf_llama):
    _, single, _ = hf_llama
    model = _model()
    model.embed = None
    del model.layers["0"]
    report = load_hf_llm(model, single)
    assert report["loaded"] == 9 + 2
    assert "model.embed_tokens.weight" in report["skipped"]
    assert "model.layers.0.self_attn.q_proj.weight" in report["skipped"]


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("field,value,ours", [
    ("num_hidden_layers", 3, "model.n_layers"),
    ("num_key_value_heads", 4, "model.n_kv_heads"),
    ("rms_norm_eps", 1e-5, "model.norm_eps"),
    ("tie_word_embeddings", True, None),
    ("vocab_size", 512, "model.vocab_size"),
])
def test_hf_llm_config_mismatch_names_field(hf_llama, tmp_path, field, value, ours):
    _, single, _ = hf_llama
    d = _copy_dir(single, tmp_path / "bad")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    model = _model()
    before = model.state_dict()["layers.0.attention.wq.weight"].clone()
    with pytest.raises(ValueError, match=field) as exc:
        load_hf_llm(model, d)
    msg = str(exc.value)
    assert "\n" not in msg and (ours is None or ours in msg)
    assert torch.equal(model.state_dict()["layers.0.attention.wq.weight"], before)  # untouched


def test_hf_llm_rope_theta_v4_and_v5_layouts(hf_llama, tmp_path):
    _, single, _ = hf_llama
    d = _copy_dir(single, tmp_path / "v4")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"], cfg["rope_scaling"] = 10000.0, None
    (d / "config.json").write_text(json.dumps(cfg))
    load_hf_llm(_model(), d)
    cfg["rope_theta"] = 500000.0
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_theta"):
        load_hf_llm(_model(), d)
    cfg["rope_theta"], cfg["rope_scaling"] = 10000.0, {"rope_type": "llama3", "factor": 8.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type"):
        load_hf_llm(_model(), d)


def test_hf_llm_missing_and_misshaped_tensors(hf_llama, tmp_path):
    _, single, _ = hf_llama
    state = load_file(str(single / "model.safetensors"))

    d = _copy_dir(single, tmp_path / "missing")
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_llm(_model(), d)

    d = _copy_dir(single, tmp_path / "shape")
    bad = dict(state)
    bad["model.layers.0.self_attn.k_proj.weight"] = bad["model.layers.0.self_attn.q_proj.weight"].clone()
    save_file(bad, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_hf_llm(model, d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded

    d = _copy_dir(single, tmp_path / "extra")
    extra = dict(state)
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry these
    save_file(extra, str(d / "model.safetensors"), metadata={"format": "pt"})
    report = load_hf_llm(_model(), d)
    assert report["ignored"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    extra["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(extra, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected"):
        load_hf_llm(_model(), d)


# ----------------------------------------------------------------------------------------------------------------
# SigLIP


def _timm_siglip(seed: int = 3):
    torch.manual_seed(seed)
    s = MODEL["siglip"]
    m = timm.create_model("vit_large_patch16_siglip_384", pretrained=False, img_size=s["image_size"],
                          patch_size=s["patch_size"], embed_dim=s["width"], depth=s["depth"],
                          num_heads=s["heads"], global_pool="map", num_classes=10)
    with torch.no_grad():  # non-trivial pos_embed / norms (timm may init some to constants)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def _images(n: int, size: int, seed: int = 5) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prefix,fmt", [("visual.trunk.", "safetensors"), ("", "pt"),
                                        ("vision_tower.", "pth"), (SIGLIP_DS, "safetensors")])
def test_siglip_matches_timm(tmp_path, prefix, fmt):
    ref = _timm_siglip()
    sd = ref.state_dict()
    assert any(k.startswith("attn_pool.") for k in sd) and "head.weight" in sd
    state = {prefix + k: v.contiguous() for k, v in sd.items()}
    if prefix:  # something else in the file, outside the tower (without a prefix it would be unexpected)
        state["logit_scale"] = torch.ones(1)
    path = tmp_path / f"siglip.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)

    model = _model()
    report = load_siglip(model, path)
    assert report["prefix"] == prefix
    assert report["loaded"] == sum(1 for k in sd if not k.startswith(("attn_pool.", "head.")))
    assert report["ignored"] and all(k[len(prefix):].startswith(("attn_pool.", "head.")) for k in report["ignored"])

    tower = model.embed.vision.siglip
    x = _images(2, 48)
    normed = (x - 0.5) / 0.5
    with torch.no_grad():
        want = ref.forward_features(normed)
        assert torch.equal(tower.vit.forward_features(normed), want)
        assert (tower(x) - want).abs().max().item() < 1e-6  # our tower normalises internally
    assert want.shape == (2, 36, 96)


def test_siglip_depth_mismatch_is_clear(tmp_path):
    ref = _timm_siglip()
    path = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"missing \d+ SigLIP tensors"):
        load_siglip(_model(siglip={**MODEL["siglip"], "depth": 4}), path)
    with pytest.raises(ValueError, match="no place in the model"):
        load_siglip(_model(siglip={**MODEL["siglip"], "depth": 2}), path)
    with pytest.raises(ValueError, match="pos_embed"):
        load_siglip(_model(siglip={**MODEL["siglip"], "image_size": 56}, sam={**MODEL["sam"], "enabled": False}),
                    path)


# ----------------------------------------------------------------------------------------------------------------
# SAM


def _timm_sam(seed: int = 4):
    torch.manual_seed(seed)
    s = MODEL["sam"]
    m = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0, img_size=s["image_size"],
                          patch_size=s["patch_size"], embed_dim=s["width"], depth=s["depth"], num_heads=s["heads"],
                          window_size=s["window_size"], global_attn_indexes=s["global_attn_indexes"],
                          neck_chans=s["neck_chans"],
                          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))  # as SAM-B's blocks
    with torch.no_grad():  # rel_pos starts at zero in timm: make it matter
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def _to_segment_anything(sd: dict, prefix: str) -> dict:
    return {prefix + k.replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2"): v.contiguous()
            for k, v in sd.items()}


def test_sam_segment_anything_checkpoint(tmp_path):
    ref = _timm_sam()
    state = _to_segment_anything(ref.state_dict(), "image_encoder.")
    assert "image_encoder.blocks.0.mlp.lin1.weight" in state
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    path = tmp_path / "sam_vit_b.pth"
    torch.save(state, path)

    model = _model()
    sam = model.embed.vision.sam
    tail_before = {k: v.clone() for k, v in sam.state_dict().items() if not k.startswith("vit.")}
    report = load_sam(model, path)
    assert report["prefix"] == "image_encoder."
    assert report["loaded"] == len(ref.state_dict())
    assert sorted(report["not_in_checkpoint"]) == sorted("embed.vision.sam." + k for k in tail_before)
    for k, v in sam.state_dict().items():  # tail (downsamples, neck_hd, hd_alpha) keeps its init
        if k in tail_before:
            assert torch.equal(v, tail_before[k]), k

    x = _images(1, 128)
    mean = torch.tensor(MODEL_SAM_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(MODEL_SAM_STD).view(1, 3, 1, 1)
    normed = (x - mean) / std
    with torch.no_grad():
        want = ref.forward_features(normed)
        got = sam.vit.forward_features(normed)
    assert want.shape == (1, 32, 16, 16)
    assert torch.equal(got, want)


MODEL_SAM_MEAN = [0.48145466, 0.4578275, 0.40821073]
MODEL_SAM_STD = [0.26862954, 0.26130258, 0.27577711]


def _deepseek_vl_checkpoint(src_model) -> dict:
    """A DeepSeek-VL-style full checkpoint built from one of our models (segment-anything names for SAM)."""
    sd = src_model.state_dict()
    out = {}
    for k, v in sd.items():
        if k.startswith("embed.vision.sam."):
            rest = k[len("embed.vision.sam."):]
            rest = rest[len("vit."):] if rest.startswith("vit.") else rest
            out[SAM_DS + rest.replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2")] = v
        elif k.startswith("embed.vision.siglip.vit."):
            out[SIGLIP_DS + k[len("embed.vision.siglip.vit."):]] = v
        elif k.startswith("embed.adaptor."):
            out["aligner." + k[len("embed.adaptor."):]] = v
    out[SIGLIP_DS + "attn_pool.latent"] = torch.randn(1, 1, 96)
    out["vision_model.high_layer_norm.weight"] = torch.ones(1024)
    out["language_model.model.embed_tokens.weight"] = torch.randn(8, 4)
    return {k: v.contiguous().clone() for k, v in out.items()}


def test_deepseek_vl_towers_round_trip(tmp_path):
    src = _model(seed=11)
    with torch.no_grad():
        src.embed.vision.sam.hd_alpha_downsamples.fill_(0.37)
        for n, p in src.embed.vision.named_parameters():
            if "rel_pos" in n:
                p.normal_(std=0.02)
    path = tmp_path / "deepseek_vl.safetensors"
    save_file(_deepseek_vl_checkpoint(src), str(path))
    assert any(".mlp.lin1." in k for k in load_file(str(path)))

    dst = _model(seed=12)
    reports = load_pretrained_parts(dst, siglip=path, sam=path)
    assert reports["sam"]["prefix"] == SAM_DS and reports["siglip"]["prefix"] == SIGLIP_DS
    assert reports["sam"]["not_in_checkpoint"] == []
    assert reports["siglip"]["ignored"] == [SIGLIP_DS + "attn_pool.latent"]
    for tower in ("sam", "siglip"):
        a = getattr(src.embed.vision, tower).state_dict()
        b = getattr(dst.embed.vision, tower).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (tower, k)
    assert dst.embed.vision.sam.hd_alpha_downsamples.item() == pytest.approx(0.37)
    # a full forward through both towers now agrees too
    with torch.no_grad():
        x = _images(2, 128)
        for got, want in zip(dst.embed.vision(x), src.embed.vision(x)):
            assert torch.equal(got, want)


def test_sam_hd_checkpoint_into_model_without_hd_path_is_refused(tmp_path):
    path = tmp_path / "deepseek_vl.safetensors"
    save_file(_deepseek_vl_checkpoint(_model(seed=11)), str(path))
    with pytest.raises(ValueError, match="neck_hd"):
        load_sam(_model(sam={**MODEL["sam"], "hd_path": False}), path)
    with pytest.raises(ValueError, match="no SAM tower"):
        load_sam(_model(sam={**MODEL["sam"], "enabled": False}), path)


def test_sam_resolution_mismatch_is_clear(tmp_path):
    ref = _timm_sam()
    path = tmp_path / "sam.safetensors"
    save_file(_to_segment_anything(ref.state_dict(), "image_encoder."), str(path))
    # 96 px (12x12 grid): pos_embed and the global blocks' rel_pos differ; interp_size keeps the 6x6 output
    with pytest.raises(ValueError, match=r"shape mismatch .*(pos_embed|rel_pos).*resampling"):
        load_sam(_model(sam={**MODEL["sam"], "image_size": 96}), path)
