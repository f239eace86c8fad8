"""The DeepSeek-VL release directory: export our model in DeepSeek-VL's released layout, import one.

    export_deepseek_vl(model_or_state, cfg, out_dir)   the whole model in DeepSeek-VL's released layout
    to_deepseek_vl_state(model_or_state, cfg)          the same tensors under their names (no files)
    import_deepseek_vl(path) -> (model_dict, state)    a DeepSeek-VL directory -> our ``model`` section + our names
    load_deepseek_vl(model, path)                      the same, streamed into a built model (checked first)

What a directory holds, and where each part lives:

    config.json                        ``deepseek_vl_config.py`` (both directions, the release tower check)
    processor and tokenizer files      ``deepseek_vl_processor.py``
    safetensors (sharded + index)      ``hf_dir.py`` writes them (temp dir, read back, renamed into place)
    tensor names                       ``models/state_dict_adapter.py`` (``deepseek_vl_key_map``)

Key names come from the IMPORT maps of the adapter (``hf_llama_key_map``, ``sam_key_to_ours``): the export
direction is their inverse (checked key by key), so there is one map per naming scheme.

DeepSeek-VL layout (``../shared/DEEPSEEK_VL_FORMAT.md``, DeepSeek-VL's ``modeling_vlm.py`` / ``clip_encoder.py``):

* hybrid (SAM on): ``vision_model.vision_tower_high.vision_tower.*`` (SAM, segment-anything names: ``mlp.lin1`` /
  ``lin2``; plus ``neck_hd``, ``downsamples``, ``hd_alpha_downsamples``), ``vision_model.vision_tower_low.
  vision_tower.*`` (SigLIP, timm ViT names), ``vision_model.{high,low}_layer_norm.*``;
  SigLIP only (1.3B, ``CLIPVisionTower``): ``vision_model.vision_tower.*``;
  ``aligner.*`` (our adaptor names already); ``language_model.model.*`` + ``language_model.lm_head.weight``.
* Tensors their modules hold but their forward does not use, which we do not have, are written so that their code
  loads the export strictly, and are ignored on import:
    - ``attn_pool.*`` of the SigLIP tower: their ``VisionTransformer`` is built with ``global_pool="map"`` so it owns
      a timm ``AttentionPoolLatent`` (latent (1, 1, w), q, kv, proj, norm, mlp) that ``ignore_head=True`` skips.
      Exported as ZEROS (LayerNorm weight ones) of the shapes timm builds for the tower's width / heads /
      mlp_ratio: visibly "not trained", never read.
    - ``vision_model.high_layer_norm`` / ``low_layer_norm`` (hybrid only): LayerNorm(output_dim), built by their
      ``HybridVisionTower`` and never called: exported as the identity LayerNorm (weight ones, bias zeros).
    - ``neck_hd.*`` / ``hd_alpha_downsamples`` when our SAM has no hd path (``model.sam.hd_path: false``): their
      ``ImageEncoderViT`` always builds the hd path (``sam_hd = True``). Exported as a copy of the neck with
      ``hd_alpha_downsamples = 0``, which makes the path a no-op (same outputs). Importing such a checkpoint gives
      ``hd_path: true`` (the keys exist); ``load_deepseek_vl`` into a model without the hd path accepts them only
      when the checkpoint's alpha is exactly 0.
* config.json and the processor / tokenizer files: see their modules.

The source of an export is a model, a state dict in our names, or our weights file / checkpoint dir
(``checkpoint/weights.py``, read lazily); tensors are gathered (DTensor), cast (optional ``dtype``) and written
one shard at a time, so a 7B export never holds a second copy of the model. Call it on one process with full
tensors (DTensors gather collectively).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vlpretrain.checkpoint.deepseek_vl_config import (
    check_aligner_dims,
    check_model_fits,
    check_release_towers,
    deepseek_vl_config,
    deepseek_vl_model_dict,
    language_config,
    model_config_from_dict,
    read_config,
)
from vlpretrain.checkpoint.deepseek_vl_processor import (
    IMAGE_TAG,
    TOKENIZER_FILE,
    check_processor_files,
    deepseek_vl_processor_files,
    import_deepseek_vl_tokenizer,
    read_image_processor,
)
from vlpretrain.checkpoint.hf_dir import Entry, Source, check_entries, entries_of, write_dir
from vlpretrain.checkpoint.paths import WEIGHTS, WEIGHTS_INDEX
from vlpretrain.checkpoint.pretrained import (
    TensorSource,
    check_hf_llm_config,
    check_shapes,
    copy_checked,
    model_tensors,
    preview_keys,
    torch_load_state,
)
from vlpretrain.config import ModelConfig
from vlpretrain.errors import UserError
from vlpretrain.models.state_dict_adapter import (
    DS_HIGH,
    DS_LAYER_NORMS,
    DS_LLM,
    DS_LOW,
    DS_SINGLE,
    SAM_VIT_PREFIX,
    deepseek_vl_key_map,
    param_shapes,
)

# ----------------------------------------------------------------------------------------------------------------
# Export


def _attn_pool_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``AttentionPoolLatent`` their SigLIP ``VisionTransformer(global_pool="map")`` owns."""
    from timm.layers import AttentionPoolLatent

    s = cfg.siglip
    with torch.device("meta"):
        pool = AttentionPoolLatent(s.width, num_heads=s.heads, mlp_ratio=s.mlp_ratio,
                                   norm_layer=nn.LayerNorm)
    return {k: tuple(v.shape) for k, v in pool.state_dict().items()}


def _is_norm_weight(name: str) -> bool:
    return name.endswith("norm.weight")


def _deepseek_vl_entries(src: Source, cfg: ModelConfig) -> dict[str, Entry]:
    check_aligner_dims(cfg)
    ours = entries_of(src)
    key_map = deepseek_vl_key_map(cfg)
    check_entries(ours, cfg, list(key_map), "export_deepseek_vl")
    out = {theirs: ours[k] for k, theirs in key_map.items()}
    ref = ours["embed.tok_embeddings.weight"]
    dt, dev = ref.dtype, (ref.device if ref.device.type == "meta" else torch.device("cpu"))

    def const(shape: tuple[int, ...], value: float) -> Entry:
        return Entry(tuple(shape), dt, lambda: torch.full(shape, value, dtype=dt, device=dev), dev)

    low = DS_LOW if cfg.sam.enabled else DS_SINGLE
    for k, shape in _attn_pool_shapes(cfg).items():
        out[low + "attn_pool." + k] = const(shape, 1.0 if _is_norm_weight(k) else 0.0)
    if cfg.sam.enabled:
        for prefix, dim in zip(DS_LAYER_NORMS, (cfg.sam.downsample_channels[-1], cfg.siglip.width)):
            out[prefix + "weight"] = const((dim,), 1.0)
            out[prefix + "bias"] = const((dim,), 0.0)
        if not cfg.sam.hd_path:  # their ImageEncoderViT always has the hd path: a no-op copy of the neck
            neck = SAM_VIT_PREFIX + "neck."
            for k, e in ours.items():
                if k.startswith(neck):  # a copy: safetensors refuses tensors that share memory
                    out[DS_HIGH + "neck_hd." + k[len(neck):]] = Entry(
                        e.shape, e.dtype, lambda e=e: e.get().detach().clone(), e.device)
            out[DS_HIGH + "hd_alpha_downsamples"] = const((1,), 0.0)
    return out


def to_deepseek_vl_state(model_or_state: Source, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights -> DeepSeek-VL names (the same tensors, not copies, for a live model), plus the tensors their
    modules need that ours do not have (see the module docstring). Works on meta tensors (layout checks)."""
    return {k: e.get() for k, e in _deepseek_vl_entries(model_or_state, cfg).items()}


def export_deepseek_vl(model_or_state: Source, cfg: ModelConfig, out_dir: str | Path, shard_bytes: int = 5 << 30,
                       dtype: torch.dtype | None = None, tokenizer: str | Path | None = None,
                       allow_nonrelease: bool = False) -> Path:
    """Write the whole model in DeepSeek-VL's released layout: config.json (``deepseek_vl_config``), the
    processor's ``preprocessor_config.json`` / ``processor_config.json`` (``deepseek_vl_processor_files``), the
    tokenizer files when ``tokenizer`` (our tokenizer.json) is given, and safetensors (sharded with an index above
    ``shard_bytes``). ``model_or_state``: a model, a state dict (our names) or our weights file / checkpoint dir.
    Towers that DeepSeek-VL's builders cannot make are refused (``check_release_towers``, before anything is read)
    unless ``allow_nonrelease``: then only our import reads the export back (test models). Returns the
    directory."""
    if not allow_nonrelease:
        check_release_towers(cfg)
    extra = deepseek_vl_processor_files(cfg, tokenizer)  # checks the tokenizer before any tensor is read
    entries = _deepseek_vl_entries(model_or_state, cfg)
    config = deepseek_vl_config(cfg, dtype or entries[DS_LLM + "model.embed_tokens.weight"].dtype)
    return write_dir(out_dir, config, entries, shard_bytes, dtype, extra)


# ----------------------------------------------------------------------------------------------------------------
# Import


def _open_weights(d: Path) -> TensorSource:
    """safetensors (single / sharded) via ``TensorSource.open``; also ``pytorch_model.bin.index.json`` shards."""
    bin_index = d / "pytorch_model.bin.index.json"
    if not (d / WEIGHTS_INDEX).is_file() and not (d / WEIGHTS).is_file() and bin_index.is_file():
        weight_map = json.loads(bin_index.read_text())["weight_map"]
        merged: dict[str, torch.Tensor] = {}
        for f in sorted(set(weight_map.values())):
            merged.update(torch_load_state(d / f))
        return TensorSource.from_state_dict(merged, str(d))
    return TensorSource.open(d)


def _ignorable(k: str) -> bool:
    return (k.startswith(DS_LAYER_NORMS) or k.endswith("rotary_emb.inv_freq")
            or k.startswith((DS_LOW + "attn_pool.", DS_SINGLE + "attn_pool.")))


def _plan(src: TensorSource, cfg: ModelConfig, accept_hd_stub: bool) -> tuple[dict[str, str], list[str]]:
    """checkpoint key -> our key for every tensor of ``src``; (plan, ignored). Raises on missing / unexpected."""
    theirs_to_ours = {t: o for o, t in deepseek_vl_key_map(cfg).items()}
    ignored = sorted(k for k in src.keys() if _ignorable(k) and k not in theirs_to_ours)
    if accept_hd_stub:
        ignored += sorted(k for k in src.keys() if k.startswith((DS_HIGH + "neck_hd.", DS_HIGH + "hd_alpha")))
    unexpected = sorted(set(src.keys()) - set(theirs_to_ours) - set(ignored))
    if unexpected:
        raise ValueError(f"{src.origin}: {len(unexpected)} tensors have no place in the model: "
                         f"{preview_keys(unexpected)}")
    missing = sorted(set(theirs_to_ours) - set(src.keys()))
    if missing:
        raise ValueError(f"{src.origin}: missing {len(missing)} tensors: {preview_keys(missing)}")
    return {k: theirs_to_ours[k] for k in src.keys() if k in theirs_to_ours}, ignored


def import_deepseek_vl(path: str | Path, tokenizer_out: str | Path | None = None
                       ) -> tuple[dict, dict[str, torch.Tensor]]:
    """A DeepSeek-VL directory (config.json + weights) -> (our ``model`` config section, state dict in our
    names). Tensors keep their stored dtype; unused tensors (attn_pool, high/low_layer_norm) are dropped. The
    processor files, when present, are checked against the model (``check_processor_files``). With
    ``tokenizer_out``, the directory's tokenizer (if it has one) is written there as our tokenizer file
    (``import_deepseek_vl_tokenizer``, after every other check) and ``image_token_id`` is taken from it."""
    d = Path(path)
    config = read_config(d)
    src = _open_weights(d)
    shapes = {k: src.shape(k) for k in src.keys()}
    model = deepseek_vl_model_dict(config, shapes, str(d), read_image_processor(d))
    cfg = model_config_from_dict(model)
    check_processor_files(d, cfg, config)
    plan, _ = _plan(src, cfg, accept_hd_stub=False)
    want = param_shapes(cfg)
    for ck, ours in plan.items():
        if tuple(src.shape(ck)) != want[ours]:
            raise ValueError(f"{src.origin}: {ck} has shape {tuple(src.shape(ck))}, {ours} needs {want[ours]}")
    if tokenizer_out is not None and (d / TOKENIZER_FILE).is_file():
        image_id = import_deepseek_vl_tokenizer(d, tokenizer_out)["image_token_id"]
        if image_id >= model["vocab_size"]:
            raise UserError(f"{d}: the tokenizer's {IMAGE_TAG} id {image_id} is outside the vocabulary "
                            f"({model['vocab_size']})")
        model["image_token_id"] = image_id
    return model, {ours: src.get(ck) for ck, ours in plan.items()}


def load_deepseek_vl(model: nn.Module, path: str | Path) -> dict:
    """Load a DeepSeek-VL directory into ``model`` (whole model or one pipeline stage): the checkpoint's config
    and every shape are checked against ``model.cfg`` before anything is copied (ValueError naming the first
    mismatch); tensors are read and copied one at a time. Returns a report (loaded / ignored / skipped / model)."""
    d = Path(path)
    cfg: ModelConfig = model.cfg
    config = read_config(d)
    src = _open_weights(d)
    shapes = {k: src.shape(k) for k in src.keys()}
    derived = deepseek_vl_model_dict(config, shapes, str(d), read_image_processor(d))
    check_hf_llm_config(language_config(config), cfg, f"{d / 'config.json'} (language_config)")
    accept_stub = False
    if cfg.sam.enabled and not cfg.sam.hd_path and derived["sam"].get("hd_path"):
        alpha = src.get(DS_HIGH + "hd_alpha_downsamples")
        if bool((alpha != 0).any()):
            raise ValueError(f"{d}: the checkpoint's SAM hd path is active (hd_alpha_downsamples = "
                             f"{alpha.flatten().tolist()}): set model.sam.hd_path: true")
        accept_stub = True  # alpha == 0: the hd path is a no-op, dropping it keeps the outputs
        derived = {**derived, "sam": {**derived["sam"], "hd_path": False}}
    check_model_fits(derived, cfg, str(d))
    check_processor_files(d, cfg, config)
    plan, ignored = _plan(src, cfg, accept_stub)
    own = model_tensors(model)
    owned = {ck: ours for ck, ours in plan.items() if ours in own}
    skipped = sorted(ck for ck, ours in plan.items() if ours not in own)
    check_shapes(src, owned, own)
    return {"loaded": copy_checked(src, owned, own), "ignored": ignored, "skipped": skipped, "origin": src.origin,
            "model": derived}
