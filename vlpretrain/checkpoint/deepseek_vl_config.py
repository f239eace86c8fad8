"""DeepSeek-VL's config.json <-> our ``model`` config section.

    deepseek_vl_config(cfg)                  the release layout's config.json for ``cfg`` (no weights needed)
    check_release_towers(cfg)                UserError unless DeepSeek-VL's builders make our towers
    deepseek_vl_model_dict(config, shapes)   a config.json + the tensor shapes -> our ``model`` section
    model_config_from_dict(model)            a checked ModelConfig from such a section
    check_model_fits(derived, cfg, origin)   ValueError naming the first field where ``cfg`` differs
    read_config(dir), language_config(config)

* config.json: ``model_type: multi_modality`` with ``vision_config`` / ``aligner_config`` / ``language_config``
  (every LlamaConfig field we depend on written explicitly). Their code derives the tower sizes from
  ``model_name`` (``siglip_large_patch16_384``, ``sam_b_downsample``), which only describes the real sizes; we
  also write our whole ``model`` section under the extra top-level key ``vlpretrain_model`` (their code ignores
  it) so that sizes their config cannot express (tiny test models: tower heads, ``interp_size``, the image token
  id) come back on import; ``export_deepseek_vl`` refuses such towers (``check_release_towers``) unless
  ``allow_nonrelease`` (exports only our import reads back, for tests). A SigLIP-only model is written as the
  released 1.3B: no ``pixel_mean`` / ``pixel_std`` in the tower params, the processor normalises (import takes
  them from ``preprocessor_config.json`` then). Everything else is derived from the DeepSeek-VL fields and the
  tensor shapes, which is what happens for the released checkpoints (no ``vlpretrain_model``): missing language
  fields take LlamaConfig's defaults, tower heads come from the ``model_name`` tables of their code.
* Their MlpProjector has one ``input_dim`` for both towers: a hybrid model whose SAM output width differs from the
  SigLIP width cannot be expressed and raises.

The whole layout: ``deepseek_vl.py``; ``../shared/DEEPSEEK_VL_FORMAT.md``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch

from vlpretrain.checkpoint.hf_dir import torch_dtype_name
from vlpretrain.checkpoint.hf_llama import LLAMA_DEFAULTS, hf_llama_config
from vlpretrain.checkpoint.pretrained import rope_settings
from vlpretrain.config import ModelConfig, config_from_dict
from vlpretrain.errors import UserError
from vlpretrain.models.state_dict_adapter import DS_HIGH, DS_LLM, DS_LOW, DS_SINGLE

HINT_KEY = "vlpretrain_model"

# Their model_name tables (siglip_vit.py SigLIP_MODEL_CONFIG, sam.py SAM_MODEL_CONFIG; window_size is fixed to 14
# in create_sam_vit): only what the weights cannot tell.
SIGLIP_MODEL_NAMES = {
    "siglip_large_patch16_384": {"heads": 16},
    "siglip_so400m_patch14_384": {"heads": 16},
    "siglip_so400m_patch14_224": {"heads": 16},
}
SAM_MODEL_NAMES = {
    "sam_b_downsample": {"heads": 12, "window_size": 14, "global_attn_indexes": [2, 5, 8, 11]},
    "sam_vit_b": {"heads": 12, "window_size": 14, "global_attn_indexes": [2, 5, 8, 11]},
    "sam_vit_l": {"heads": 16, "window_size": 14, "global_attn_indexes": [5, 11, 17, 23]},
    "sam_vit_h": {"heads": 16, "window_size": 14, "global_attn_indexes": [7, 15, 23, 31]},
}

# The towers their builders make for the model names we write (siglip_vit.py create_siglip_vit, sam.py
# create_sam_vit + ImageEncoderViT): every size is taken from the name, except the input sizes; SAM's window (14),
# neck (256 channels) and 96x96 resize are constants of their code. Only these towers can be exported for their
# code; anything else would load into different modules (or fail to load) there.
RELEASE_SIGLIP = {"patch_size": 16, "width": 1024, "depth": 24, "heads": 16, "mlp_ratio": 4.0}
RELEASE_SAM = {"image_size": 1024, "patch_size": 16, "width": 768, "depth": 12, "heads": 12, "window_size": 14,
               "global_attn_indexes": [2, 5, 8, 11], "neck_chans": 256, "interp_size": 96,
               "downsample_channels": [512, 1024]}


# ----------------------------------------------------------------------------------------------------------------
# Writing: our config -> config.json


def check_aligner_dims(cfg: ModelConfig) -> None:
    """ValueError when the aligner cannot be written: one MlpProjector ``input_dim`` for both towers."""
    if cfg.sam.enabled and cfg.sam.downsample_channels[-1] != cfg.siglip.width:
        raise ValueError(f"DeepSeek-VL's MlpProjector has one input_dim for both towers: model.sam."
                         f"downsample_channels[-1]={cfg.sam.downsample_channels[-1]} differs from model.siglip."
                         f"width={cfg.siglip.width}, which its config cannot express")


def check_release_towers(cfg: ModelConfig) -> None:
    """UserError (one line, the first differing field) unless the towers are the ones DeepSeek-VL's builders make
    from the model names an export writes (``siglip_large_patch16_384``, ``sam_b_downsample``). SigLIP's input
    size is free for a SigLIP-only model (their builder takes it from the config); in the hybrid tower both
    towers must give 576 tokens, so both input sizes are the released ones."""
    want_siglip = dict(RELEASE_SIGLIP, **({"image_size": 384} if cfg.sam.enabled else {}))
    checks = [(f"siglip.{k}", getattr(cfg.siglip, k), v, "siglip_large_patch16_384")
              for k, v in want_siglip.items()]
    if cfg.sam.enabled:
        checks += [(f"sam.{k}", getattr(cfg.sam, k), v, "sam_b_downsample") for k, v in RELEASE_SAM.items()]
    for field, got, want, name in checks:
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            raise UserError(f"model.{field} = {got!r}: DeepSeek-VL's code builds {name} with {want!r} (its tower "
                            f"sizes come from the model name), so this model cannot be exported in its format")


def deepseek_vl_config(cfg: ModelConfig, dtype: torch.dtype | str | None = None) -> dict:
    """DeepSeek-VL's config.json for ``cfg`` (``MultiModalityCausalLM``); needs no weights."""
    check_aligner_dims(cfg)
    s = cfg.siglip
    low = {"model_name": "siglip_large_patch16_384", "image_size": s.image_size, "output_dim": s.width,
           "pixel_mean": list(s.mean), "pixel_std": list(s.std), "select_feature": "same", "select_layer": -1,
           "ckpt_path": ""}
    if not cfg.sam.enabled:  # as the released 1.3B: the tower does not normalise, the processor does
        del low["pixel_mean"], low["pixel_std"]
    if cfg.sam.enabled:
        a = cfg.sam
        high = {"model_name": "sam_b_downsample", "image_size": a.image_size, "output_dim": a.downsample_channels[-1],
                "pixel_mean": list(a.mean), "pixel_std": list(a.std), "select_feature": "same", "select_layer": -1,
                "ckpt_path": ""}
        vision = {"cls": "HybridVisionTower", "model_type": "vision",
                  "params": {"concat_type": "tuple", "high_res_cfg": high, "low_res_cfg": low}}
        projector = "low_high_hybrid_split_mlp_gelu"
    else:
        vision = {"cls": "CLIPVisionTower", "model_type": "vision", "params": low}
        projector = "mlp_gelu"
    language = hf_llama_config(cfg, dtype)
    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "torch_dtype": torch_dtype_name(dtype),
        "vision_config": vision,
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"projector_type": projector, "input_dim": s.width, "n_embed": cfg.dim,
                                      "depth": 2}},
        "language_config": language,
        HINT_KEY: dataclasses.asdict(cfg),
    }


# ----------------------------------------------------------------------------------------------------------------
# Reading: config.json + tensor shapes -> our config


def read_config(d: Path) -> dict:
    """The config.json of directory ``d`` (FileNotFoundError naming ``d`` when absent)."""
    f = d / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{d}: no config.json (expected a DeepSeek-VL model directory)")
    return json.loads(f.read_text())


def language_config(config: dict) -> dict:
    """``language_config`` with LlamaConfig's defaults for absent fields (no GQA unless it says so)."""
    lang = dict(LLAMA_DEFAULTS)
    lang.update({k: v for k, v in (config.get("language_config") or {}).items() if v is not None})
    if "num_key_value_heads" not in (config.get("language_config") or {}):
        lang["num_key_value_heads"] = lang["num_attention_heads"]
    return lang


def _count(shapes: Mapping[str, tuple], prefix: str) -> int:
    """1 + the largest ``i`` among keys ``<prefix><i>.*`` (0 if none): a missing tensor of some block is then
    reported as missing instead of shrinking the depth."""
    idx = [k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)]
    idx = [int(i) for i in idx if i.isdigit()]
    return max(idx) + 1 if idx else 0


class _Shapes:
    """A checkpoint's tensor shapes by name; every error names the checkpoint (``origin``)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], origin: str):
        self.shapes = shapes
        self.origin = origin

    def fail(self, msg: str) -> NoReturn:
        raise ValueError(f"{self.origin}: {msg}")

    def __call__(self, k: str) -> tuple[int, ...]:
        if k not in self.shapes:
            self.fail(f"missing tensor {k}")
        return tuple(self.shapes[k])

    def __contains__(self, k: str) -> bool:
        return k in self.shapes

    def count(self, prefix: str) -> int:
        return _count(self.shapes, prefix)


def deepseek_vl_model_dict(config: dict, shapes: Mapping[str, tuple[int, ...]], origin: str = "checkpoint",
                           image_processor: Mapping[str, Any] | None = None) -> dict:
    """Our ``model`` config section for a DeepSeek-VL checkpoint, from its config.json and tensor shapes.

    LLM sizes come from ``language_config`` (LlamaConfig defaults fill absent fields) and are checked against the
    shapes; tower sizes come from the shapes, heads (and SAM windows when the shapes are ambiguous) from the
    ``model_name`` tables or our ``vlpretrain_model`` entry when present (which also gives name, image token id,
    init std and ``interp_size``). SigLIP's mean / std come from its tower params when it normalises, else from
    ``image_processor`` (the directory's preprocessor_config.json: the released 1.3B normalises there; identity
    when it does not), else SigLIP's 0.5 / 0.5."""
    shape = _Shapes(shapes, origin)
    if config.get("model_type") != "multi_modality":
        shape.fail(f"model_type = {config.get('model_type')!r}, expected 'multi_modality' "
                   f"(a DeepSeek-VL checkpoint)")
    hint = config.get(HINT_KEY) or {}
    cls, hybrid, low_cfg, high_cfg = _vision_towers(config, shape)
    model = _language_section(config, hint, shape)
    model["siglip"] = _siglip_section(DS_LOW if hybrid else DS_SINGLE, low_cfg, hint, image_processor, shape)
    _check_aligner(config, cls, hybrid, shape)
    model["sam"] = _sam_section(high_cfg, hint, model["siglip"], shape) if hybrid else {"enabled": False}
    return model


def _vision_towers(config: dict, shape: _Shapes) -> tuple[str, bool, dict, dict]:
    """(vision_config.cls, hybrid, SigLIP tower params, SAM tower params) of a config.json."""
    vision = config.get("vision_config") or {}
    params = vision.get("params") or {}
    cls = vision.get("cls", "")
    if "HybridVisionTower" in cls:
        return cls, True, params.get("low_res_cfg") or {}, params.get("high_res_cfg") or {}
    if "CLIPVisionTower" in cls:
        if not str(params.get("model_name", "siglip")).startswith("siglip"):
            shape.fail(f"vision tower {params.get('model_name')!r} is not supported "
                       f"(SigLIP or the hybrid tower only)")
        return cls, False, params, {}
    shape.fail(f"vision_config.cls = {cls!r}, expected HybridVisionTower or CLIPVisionTower")


def _language_section(config: dict, hint: Mapping[str, Any], shape: _Shapes) -> dict[str, Any]:
    """The decoder fields of our ``model`` section: ``language_config`` checked against the shapes."""
    lang = language_config(config)
    llm = DS_LLM + "model."
    vocab, dim = shape(llm + "embed_tokens.weight")
    n_layers = shape.count(llm + "layers.")
    heads = lang["num_attention_heads"]
    head_dim = dim // heads
    derived = {"vocab_size": vocab, "hidden_size": dim, "num_hidden_layers": n_layers,
               "intermediate_size": shape(llm + "layers.0.mlp.gate_proj.weight")[0] if n_layers else None,
               "num_key_value_heads": shape(llm + "layers.0.self_attn.k_proj.weight")[0] // head_dim
               if n_layers else None}
    for field, got in derived.items():
        if lang[field] != got:
            shape.fail(f"language_config.{field} = {lang[field]} but the weights give {got}")
    rope_theta, rope_type = rope_settings(lang)  # v4 rope_theta / rope_scaling or v5 rope_parameters
    if rope_type != "default":
        shape.fail(f"language_config rope type {rope_type!r} is not supported (no rope scaling here)")
    model: dict[str, Any] = {
        "name": hint.get("name", "deepseek-vl-import"),
        "vocab_size": vocab, "dim": dim, "n_layers": n_layers, "n_heads": heads,
        "n_kv_heads": derived["num_key_value_heads"] if derived["num_key_value_heads"] != heads else None,
        "ffn_dim": derived["intermediate_size"], "norm_eps": float(lang["rms_norm_eps"]),
        "rope_theta": rope_theta,
        "max_seq_len": int(lang["max_position_embeddings"]),
    }
    for field in ("init_std", "image_token_id"):
        if field in hint:
            model[field] = hint[field]
    return model


def _siglip_section(low: str, low_cfg: Mapping[str, Any], hint: Mapping[str, Any],
                    image_processor: Mapping[str, Any] | None, shape: _Shapes) -> dict[str, Any]:
    """``model.siglip`` from the tower under ``low``: sizes from the shapes, heads from the hint or the name."""
    hs = hint.get("siglip") or {}
    width, _, patch, _ = shape(low + "patch_embed.proj.weight")
    depth = shape.count(low + "blocks.")
    name = str(low_cfg.get("model_name", ""))
    sig_heads = hs.get("heads", SIGLIP_MODEL_NAMES.get(name, {}).get("heads"))
    if sig_heads is None:
        shape.fail(f"cannot tell the SigLIP heads: unknown model_name {name!r} and no {HINT_KEY} entry")
    image_size = int(low_cfg.get("image_size", 384))
    if shape(low + "pos_embed") != (1, (image_size // patch) ** 2, width):
        shape.fail(f"SigLIP pos_embed {shape(low + 'pos_embed')} does not fit "
                   f"image_size {image_size} / patch {patch}")
    return {"image_size": image_size, "patch_size": patch, "width": width, "depth": depth, "heads": sig_heads,
            "mlp_ratio": shape(low + "blocks.0.mlp.fc1.weight")[0] / width if depth else 4.0,
            **_siglip_norm(low_cfg, image_processor)}


def _check_aligner(config: dict, cls: str, hybrid: bool, shape: _Shapes) -> None:
    aligner = (config.get("aligner_config") or {}).get("params") or {}
    ptype = aligner.get("projector_type")
    want = "low_high_hybrid_split_mlp_gelu" if hybrid else "mlp_gelu"
    if ptype != want:
        shape.fail(f"aligner_config.params.projector_type = {ptype!r}, expected {want!r} for a {cls}")
    if aligner.get("depth", 2) != 2:
        shape.fail(f"aligner_config.params.depth = {aligner.get('depth')}, only 2 is supported")


def _sam_section(high_cfg: Mapping[str, Any], hint: Mapping[str, Any], siglip: Mapping[str, Any],
                 shape: _Shapes) -> dict[str, Any]:
    """``model.sam`` from the high tower: sizes from the shapes, window size and global blocks from the rel_pos
    shapes when they tell (else the hint or the name), heads from the hint or the name."""
    ha = hint.get("sam") or {}
    name = str(high_cfg.get("model_name", ""))
    table = SAM_MODEL_NAMES.get(name, {})
    width, _, patch, _ = shape(DS_HIGH + "patch_embed.proj.weight")
    depth = shape.count(DS_HIGH + "blocks.")
    image_size = int(high_cfg.get("image_size", 1024))
    grid = image_size // patch
    if shape(DS_HIGH + "pos_embed") != (1, grid, grid, width):
        shape.fail(f"SAM pos_embed {shape(DS_HIGH + 'pos_embed')} does not fit "
                   f"image_size {image_size} / patch {patch}")
    if depth and shape(DS_HIGH + "blocks.0.mlp.lin1.weight")[0] != 4 * width:
        shape.fail("SAM mlp ratio is not 4 (the only one timm's samvit builds here)")
    sizes = [(shape(DS_HIGH + f"blocks.{i}.attn.rel_pos_h")[0] + 1) // 2 for i in range(depth)]
    windowed = sorted({s for s in sizes if s != grid})
    if len(windowed) == 1 and grid in sizes:  # unambiguous: global blocks see the whole grid
        window_size, global_idx = windowed[0], [i for i, s in enumerate(sizes) if s == grid]
    else:
        window_size = ha.get("window_size", table.get("window_size"))
        global_idx = ha.get("global_attn_indexes", table.get("global_attn_indexes"))
        if window_size is None or global_idx is None:
            shape.fail(f"cannot tell SAM's window size / global blocks from the weights, unknown model_name "
                       f"{name!r} and no {HINT_KEY} entry")
    sam_heads = ha.get("heads", table.get("heads"))
    if sam_heads is None:
        shape.fail(f"cannot tell the SAM heads: unknown model_name {name!r} and no {HINT_KEY} entry")
    n_down = shape.count(DS_HIGH + "downsamples.")
    down = [shape(DS_HIGH + f"downsamples.{i}.weight")[0] for i in range(n_down)]
    sig_grid = siglip["image_size"] // siglip["patch_size"]
    return {"enabled": True, "image_size": image_size, "patch_size": patch, "width": width, "depth": depth,
            "heads": sam_heads, "window_size": window_size, "global_attn_indexes": list(global_idx),
            "neck_chans": shape(DS_HIGH + "neck.0.weight")[0],
            "interp_size": ha.get("interp_size", sig_grid * 2 ** n_down),
            "downsample_channels": down, "hd_path": DS_HIGH + "neck_hd.0.weight" in shape,
            "mean": [float(x) for x in high_cfg.get("pixel_mean", ModelConfig().sam.mean)],
            "std": [float(x) for x in high_cfg.get("pixel_std", ModelConfig().sam.std)]}


def _siglip_norm(tower: Mapping[str, Any], image_processor: Mapping[str, Any] | None) -> dict:
    """{"mean", "std"} of the SigLIP input normalisation: the tower's own, or the processor's (see
    ``deepseek_vl_model_dict``)."""
    if tower.get("pixel_mean") is not None and tower.get("pixel_std") is not None:
        mean, std = tower["pixel_mean"], tower["pixel_std"]
    elif image_processor is None:
        mean, std = [0.5] * 3, [0.5] * 3
    elif image_processor.get("do_normalize", False):
        mean, std = image_processor.get("image_mean", [0.5] * 3), image_processor.get("image_std", [0.5] * 3)
    else:  # neither the processor nor the tower normalises: the tower sees [0, 1] pixels
        mean, std = [0.0] * 3, [1.0] * 3
    return {"mean": [float(x) for x in mean], "std": [float(x) for x in std]}


def model_config_from_dict(model: dict) -> ModelConfig:
    """A checked ModelConfig from a ``model`` section (via ``config_from_dict``)."""
    seq = max(int(model.get("max_seq_len", 4096)), 2)
    return config_from_dict({"model": model, "train": {"seq_len": seq}}).model


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)


def check_model_fits(derived: dict, cfg: ModelConfig, origin: str) -> None:
    """Raise naming the first field of our ``model`` section where ``cfg`` differs from the checkpoint's."""
    def fail(field: str, got, want) -> None:
        raise ValueError(f"{origin}: checkpoint has model.{field} = {got!r}, the model config has {want!r}")

    def same(x, y) -> bool:
        if isinstance(x, float) or isinstance(y, float):
            return _close(float(x), float(y))
        if isinstance(x, list) and isinstance(y, list):
            return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
        return x == y

    ck = model_config_from_dict(derived)
    fields = ["vocab_size", "dim", "n_layers", "n_heads", "kv_heads", "ffn_dim", "norm_eps", "rope_theta"]
    for f in fields:
        if not same(getattr(ck, f), getattr(cfg, f)):
            fail("n_kv_heads" if f == "kv_heads" else f, getattr(ck, f), getattr(cfg, f))
    for f in ("image_size", "patch_size", "width", "depth", "heads", "mlp_ratio", "mean", "std"):
        if not same(getattr(ck.siglip, f), getattr(cfg.siglip, f)):
            fail(f"siglip.{f}", getattr(ck.siglip, f), getattr(cfg.siglip, f))
    if ck.sam.enabled != cfg.sam.enabled:
        fail("sam.enabled", ck.sam.enabled, cfg.sam.enabled)
    if cfg.sam.enabled:
        for f in ("image_size", "patch_size", "width", "depth", "heads", "window_size", "global_attn_indexes",
                  "neck_chans", "interp_size", "downsample_channels", "hd_path", "mean", "std"):
            if not same(getattr(ck.sam, f), getattr(cfg.sam, f)):
                fail(f"sam.{f}", getattr(ck.sam, f), getattr(cfg.sam, f))
