"""Export to / import from the HF LLaMA and DeepSeek-VL checkpoint layouts.

    export_hf_llama(model_or_state, cfg, out_dir)      the language model as a HF ``LlamaForCausalLM`` directory
    export_deepseek_vl(model_or_state, cfg, out_dir)   the whole model in DeepSeek-VL's released layout
    deepseek_vl_config(cfg)                            that layout's config.json (no weights needed)
    import_deepseek_vl(path) -> (model_dict, state)    a DeepSeek-VL directory -> our ``model`` section + our names
    load_deepseek_vl(model, path)                      the same, streamed into a built model (checked first)
    deepseek_vl_processor_files(cfg, tokenizer)        preprocessor / processor / tokenizer files of an export
    import_deepseek_vl_tokenizer(path, out_file)       a DeepSeek-VL directory's tokenizer -> our tokenizer file

Key names come from ``models/state_dict_adapter.py``, whose IMPORT maps (``hf_llama_key_map``, ``sam_key_to_ours``)
are the reference: the export direction is their inverse (checked key by key), so there is one map per naming
scheme.

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

Beside config.json an export carries what their ``VLChatProcessor.from_pretrained(DIR)`` reads:
``preprocessor_config.json`` (their ``VLMImageProcessor``: the model's input size, padding with the first tower's
mean colour, normalising only where the vision config's towers do not), ``processor_config.json``
(``<image_placeholder>`` -> ``image_tokens`` ids, the "deepseek" chat format) and, given our tokenizer.json, the
tokenizer as a ``LlamaTokenizerFast`` directory (tokenizer.json with a BOS post-processor as DeepSeek-LLM's,
tokenizer_config.json, special_tokens_map.json). Import checks the processor files against the model and turns
the tokenizer back into ours (adding ``<image_placeholder>`` / ``<pad>`` when absent, as their processor adds the
image tag).

Every export is written to a temporary directory beside ``out_dir``, read back (keys and shapes) and then renamed
into place (an existing ``out_dir`` is replaced only after the new one is complete). The source is a model, a
state dict in our names, or our weights file / checkpoint dir (``checkpoint/weights.py``, read lazily); tensors are
gathered (DTensor), cast (optional ``dtype``) and written one shard at a time, so a 7B export never holds a second
copy of the model. Call it on one process with full tensors (DTensors gather collectively).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from vlpretrain.checkpoint.paths import WEIGHTS, WEIGHTS_INDEX, find_weights
from vlpretrain.checkpoint.pretrained import (
    TensorSource,
    check_hf_llm_config,
    check_shapes,
    copy_checked,
    model_tensors,
    preview_keys,
    rope_settings,
    torch_load_state,
)
from vlpretrain.checkpoint.safetensors_stream import save_streaming
from vlpretrain.config import ModelConfig, config_from_dict
from vlpretrain.data.special_tokens import IMAGE_PLACEHOLDER
from vlpretrain.errors import UserError
from vlpretrain.models.state_dict_adapter import (
    DS_HIGH,
    DS_LAYER_NORMS,
    DS_LLM,
    DS_LOW,
    DS_SINGLE,
    SAM_VIT_PREFIX,
    deepseek_vl_key_map,
    hf_llama_export_map,
    param_shapes,
)

HF_WEIGHTS, HF_INDEX = WEIGHTS, WEIGHTS_INDEX
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

# transformers' LlamaConfig defaults: the released DeepSeek-VL language_config only lists a few fields
LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "rms_norm_eps": 1e-6,
                  "max_position_embeddings": 2048, "tie_word_embeddings": False, "hidden_act": "silu",
                  "attention_bias": False, "mlp_bias": False, "model_type": "llama"}


# ----------------------------------------------------------------------------------------------------------------
# config.json dicts


def _dtype_name(dtype: torch.dtype | str | None) -> str:
    if dtype is None:
        return "float32"
    return str(dtype).removeprefix("torch.")


def hf_llama_config(cfg: ModelConfig, dtype: torch.dtype | str | None = None) -> dict:
    """The LlamaConfig dict of our decoder, every field we depend on written explicitly."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "torch_dtype": _dtype_name(dtype),
    }


def _check_aligner_dims(cfg: ModelConfig) -> None:
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
    _check_aligner_dims(cfg)
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
        "torch_dtype": _dtype_name(dtype),
        "vision_config": vision,
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"projector_type": projector, "input_dim": s.width, "n_embed": cfg.dim,
                                      "depth": 2}},
        "language_config": language,
        HINT_KEY: dataclasses.asdict(cfg),
    }


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


# ----------------------------------------------------------------------------------------------------------------
# Writing

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclasses.dataclass
class _Entry:
    """One tensor to write: shape and dtype known up front, the values read only when its shard is written."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]
    device: torch.device = torch.device("cpu")


Source = nn.Module | Mapping[str, torch.Tensor] | str | Path


def _entries_of(src: Source) -> dict[str, _Entry]:
    """Our tensors by name: a model, a state dict, or our weights file / checkpoint dir (``find_weights``; read
    lazily with ``safe_open``, so a 7B export holds one shard at a time)."""
    if isinstance(src, (str, Path)):
        found = find_weights(src)
        if found.is_dir():  # a DCP checkpoint without full weights: read tensor by tensor from its shards
            return _dcp_entries(found)
        tensors = TensorSource.from_safetensors([found], str(found))  # opens the file per read: no pages kept
        with safe_open(str(found), framework="pt", device="cpu") as h:
            dtypes = {k: _ST_DTYPES[h.get_slice(k).get_dtype()] for k in h.keys()}
        return {k: _Entry(tensors.shape(k), dtypes[k], lambda k=k: tensors.get(k)) for k in tensors.keys()}
    state = src if isinstance(src, Mapping) else src.state_dict()
    return {k: _Entry(tuple(v.shape), v.dtype, lambda v=v: v, v.device) for k, v in state.items()}


def _dcp_entries(step_dir: Path) -> dict[str, _Entry]:
    """The model tensors of a DCP checkpoint, each loaded alone (``dcp.load`` of one key, no process group)
    when it is written: the export never holds more than one tensor."""
    import torch.distributed.checkpoint as dcp

    from vlpretrain.checkpoint.integrity import SafeReader

    meta = SafeReader(str(step_dir)).read_metadata()

    def load(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        state = {key: torch.empty(shape, dtype=dtype)}
        dcp.load(state, storage_reader=SafeReader(str(step_dir)), no_dist=True)
        return state[key]

    return {k[len("model."):]: _Entry(tuple(m.size), m.properties.dtype,
                                      functools.partial(load, k, tuple(m.size), m.properties.dtype))
            for k, m in meta.state_dict_metadata.items() if k.startswith("model.") and hasattr(m, "size")}


def _full(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # DTensor (FSDP / TP): gather the full tensor (a collective: every rank calls)
        t = t.full_tensor()
    t = t.detach()
    if t.is_meta:
        raise ValueError("cannot export meta tensors: materialise the model first")
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.cpu().contiguous()


def _check_entries(entries: Mapping[str, _Entry], cfg: ModelConfig, keys: list[str], what: str) -> None:
    """Every name in ``keys`` must be present with the shape a ``cfg`` model has."""
    want = param_shapes(cfg)
    missing = [k for k in keys if k not in entries]
    if missing:
        raise ValueError(f"{what}: the weights lack {len(missing)} parameters of the model config, e.g. "
                         f"{preview_keys(missing)} (a whole model is needed, not one pipeline stage)")
    for k in keys:
        if entries[k].shape != want[k]:
            raise ValueError(f"{what}: {k} has shape {entries[k].shape}, the model config gives {want[k]}")


def _shard_plan(items: list[tuple[str, int]], shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in items:
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_dir(out_dir: str | Path, config: dict, entries: Mapping[str, _Entry], shard_bytes: int,
               dtype: torch.dtype | None, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write config.json, ``extra_files`` (name -> bytes: processor / tokenizer files) and the tensors (single
    file or shards + index) into a temp dir beside ``out_dir``, read the files back (names, shapes), then rename
    the temp dir to ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

        def nbytes(e: _Entry) -> int:
            dt = dtype if (dtype is not None and e.dtype.is_floating_point) else e.dtype
            return math.prod(e.shape) * torch.empty((), dtype=dt).element_size()

        sizes = {n: nbytes(e) for n, e in entries.items()}
        shards = _shard_plan(list(sizes.items()), shard_bytes)
        if len(shards) == 1:
            files = [HF_WEIGHTS]
        else:
            files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map: dict[str, str] = {}
        def out_dtype(e: _Entry) -> torch.dtype:
            return dtype if (dtype is not None and e.dtype.is_floating_point) else e.dtype

        for file, shard in zip(files, shards):  # tensor by tensor: one tensor in memory, not one shard
            specs = {n: (entries[n].shape, out_dtype(entries[n])) for n in shard}
            save_streaming(tmp / file, ((n, _full(entries[n].get(), dtype)) for n in shard), specs,
                           metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        seen = 0
        for file in files:  # read back before publishing
            with safe_open(str(tmp / file), framework="pt") as f:
                for k in f.keys():
                    seen += 1
                    if weight_map.get(k) != file or tuple(f.get_slice(k).get_shape()) != entries[k].shape:
                        raise RuntimeError(f"export verification failed for {k} in {tmp / file}")
        if seen != len(entries):
            raise RuntimeError(f"export verification failed: {seen} tensors written, {len(entries)} expected")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_hf_llama(model_or_state: Source, cfg: ModelConfig, out_dir: str | Path, shard_bytes: int = 5 << 30,
                    dtype: torch.dtype | None = None) -> Path:
    """Write the language model as a HF ``LlamaForCausalLM`` directory: config.json (``hf_llama_config``) and
    safetensors with HF names, one ``model.safetensors`` or, above ``shard_bytes``, ``model-0000i-of-0000n``
    shards with ``model.safetensors.index.json``. ``model_or_state``: a model, a state dict (our names) or our
    weights file / checkpoint dir. Vision and adaptor tensors are not written. Returns the directory."""
    ours = _entries_of(model_or_state)
    to_hf = hf_llama_export_map(cfg.n_layers)
    _check_entries(ours, cfg, list(to_hf), "export_hf_llama")
    config = hf_llama_config(cfg, dtype or ours["embed.tok_embeddings.weight"].dtype)
    return _write_dir(out_dir, config, {to_hf[k]: ours[k] for k in to_hf}, shard_bytes, dtype)


def _deepseek_vl_entries(src: Source, cfg: ModelConfig) -> dict[str, _Entry]:
    _check_aligner_dims(cfg)
    ours = _entries_of(src)
    key_map = deepseek_vl_key_map(cfg)
    _check_entries(ours, cfg, list(key_map), "export_deepseek_vl")
    out = {theirs: ours[k] for k, theirs in key_map.items()}
    ref = ours["embed.tok_embeddings.weight"]
    dt, dev = ref.dtype, (ref.device if ref.device.type == "meta" else torch.device("cpu"))

    def const(shape: tuple[int, ...], value: float) -> _Entry:
        return _Entry(tuple(shape), dt, lambda: torch.full(shape, value, dtype=dt, device=dev), dev)

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
                    out[DS_HIGH + "neck_hd." + k[len(neck):]] = _Entry(
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
    return _write_dir(out_dir, config, entries, shard_bytes, dtype, extra)


# ----------------------------------------------------------------------------------------------------------------
# Processor and tokenizer files (what DeepSeek-VL's ``VLChatProcessor.from_pretrained(DIR)`` reads)
#
# Their processor (``processing_vlm.py``) is a transformers ``ProcessorMixin`` of an ``AutoImageProcessor`` (their
# ``VLMImageProcessor``, registered under ``image_processor_type``) and a ``LlamaTokenizerFast``; its own settings
# come from ``processor_config.json``. The image processor resizes the longer side to ``image_size``, pads with
# ``int(255 * image_mean)``, scales by ``rescale_factor`` and, when ``do_normalize``, normalises with
# ``image_mean`` / ``image_std``; the processor expands each ``image_tag`` into ``num_image_tokens`` ids.

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
IMAGE_TAG = IMAGE_PLACEHOLDER  # the processor's "image_tag"


def _tower_normalises(cfg: ModelConfig) -> bool:
    """Whether the exported vision config makes their towers normalise (``pixel_mean`` / ``pixel_std`` in the
    tower params): then the processor must not, or images would be normalised twice."""
    return _config_tower_normalises(deepseek_vl_config(cfg))


def deepseek_vl_processor_configs(cfg: ModelConfig) -> tuple[dict, dict]:
    """(preprocessor_config.json, processor_config.json) for ``cfg``, as in the released repos: the image processor
    at the model's input size (SAM's for the hybrid tower, SigLIP's alone), padding with the first tower's mean
    colour (what our data path does, ``data/preprocess.py``), normalising only where the towers do not."""
    mean, std = (cfg.sam.mean, cfg.sam.std) if cfg.sam.enabled else (cfg.siglip.mean, cfg.siglip.std)
    image = {"image_processor_type": "VLMImageProcessor", "processor_class": "VLChatProcessor",
             "image_size": cfg.image_size, "min_size": 14, "image_mean": list(mean), "image_std": list(std),
             "rescale_factor": 1.0 / 255.0, "do_normalize": not _tower_normalises(cfg),
             "background_color": [int(x * 255) for x in mean]}
    processor = {"processor_class": "VLChatProcessor", "image_tag": IMAGE_TAG,
                 "num_image_tokens": cfg.image_tokens, "add_special_token": False, "sft_format": "deepseek",
                 "mask_prompt": True, "ignore_id": -100}
    return image, processor


def _tokenizer_files(cfg: ModelConfig, path: str | Path) -> dict[str, bytes]:
    """tokenizer.json (ours, plus the post-processor that puts BOS first, as DeepSeek-LLM's file has: their
    processor encodes with ``tokenizer.encode``), tokenizer_config.json and special_tokens_map.json."""
    from tokenizers import processors

    from vlpretrain.data.tokenizer import BOS, EOS, IMAGE, PAD, TextTokenizer

    tok = TextTokenizer(path)  # UserError for a missing special token or a damaged file
    if tok.image_id != cfg.image_token_id:
        raise UserError(f"tokenizer {path}: {IMAGE} has id {tok.image_id}, model.image_token_id is "
                        f"{cfg.image_token_id}")
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {path}: {tok.vocab_size} tokens, more than model.vocab_size={cfg.vocab_size}")
    t = tok.tok
    t.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                     special_tokens=[(BOS, tok.bos_id)])
    tok_config = {"tokenizer_class": "LlamaTokenizerFast", "processor_class": "VLChatProcessor",
                  "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
                  "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "legacy": True, "model_max_length": cfg.max_seq_len}
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IMAGE]}

    def js(d: dict) -> bytes:
        return (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode()

    return {TOKENIZER_FILE: _legacy_merges(t.to_str()), TOKENIZER_CONFIG: js(tok_config),
            SPECIAL_TOKENS_MAP: js(special)}


def _legacy_merges(tokenizer_json: str) -> bytes:
    """BPE merges as "a b" strings (the form of DeepSeek-LLM's file), not the [a, b] pairs tokenizers >= 0.20
    writes: the tokenizers their transformers 4.x needs (< 0.19) cannot read the pairs. Kept as pairs only if a
    token holds a space (which "a b" cannot express; byte-level BPE never has one)."""
    d = json.loads(tokenizer_json)
    merges = (d.get("model") or {}).get("merges")
    if merges and isinstance(merges[0], list) and not any(" " in x for m in merges for x in m):
        d["model"]["merges"] = [" ".join(m) for m in merges]
    return (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode()


def deepseek_vl_processor_files(cfg: ModelConfig, tokenizer: str | Path | None = None) -> dict[str, bytes]:
    """The files beside config.json that their ``VLChatProcessor.from_pretrained`` reads (name -> bytes):
    preprocessor_config.json, processor_config.json and, with ``tokenizer`` (our tokenizer.json), the tokenizer
    files. A tokenizer that does not fit the model raises UserError (one line)."""
    image, processor = deepseek_vl_processor_configs(cfg)
    out = {PREPROCESSOR_CONFIG: (json.dumps(image, indent=2) + "\n").encode(),
           PROCESSOR_CONFIG: (json.dumps(processor, indent=2) + "\n").encode()}
    if tokenizer is not None:
        out.update(_tokenizer_files(cfg, tokenizer))
    return out


def _token_content(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def import_deepseek_vl_tokenizer(path: str | Path, out_file: str | Path) -> dict:
    """The tokenizer of a DeepSeek-VL directory (tokenizer.json; BOS / EOS named in tokenizer_config.json or
    special_tokens_map.json) -> our tokenizer file ``out_file``, written atomically. Like their processor, a
    tokenizer without ``<image_placeholder>`` gets it added as a special token; ``<pad>`` (which our data path
    needs) likewise. Returns {"tokenizer", "image_token_id", "added"}. UserError (one line) when the directory has
    no tokenizer.json or its BOS / EOS are not DeepSeek-LLM's."""
    from tokenizers import AddedToken, Tokenizer

    from vlpretrain.data.tokenizer import BOS, EOS, IMAGE, PAD, TextTokenizer

    d = Path(path)
    f = d / TOKENIZER_FILE
    if not f.is_file():
        raise UserError(f"{d}: no {TOKENIZER_FILE} (a DeepSeek-VL directory carries its tokenizer)")
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        raise UserError(f"{f}: not a tokenizers JSON file ({(str(e).splitlines() or ['?'])[0]})") from None
    named: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # tokenizer_config.json wins
        if (d / name).is_file():
            named.update({k: v for k, v in json.loads((d / name).read_text()).items() if v is not None})
    for key, want in (("bos_token", BOS), ("eos_token", EOS)):
        got = _token_content(named.get(key, want))
        if got != want or tok.token_to_id(want) is None:
            raise UserError(f"{d}: {key} is {got!r} (id {tok.token_to_id(str(got))}), expected DeepSeek-LLM's "
                            f"{want!r} in {TOKENIZER_FILE}")
    added = [t for t in (IMAGE, PAD) if tok.token_to_id(t) is None]
    if added:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, out)
    ours = TextTokenizer(out)
    return {"tokenizer": str(out), "image_token_id": ours.image_id, "added": added}


def _config_tower_normalises(config: dict) -> bool:
    params = (config.get("vision_config") or {}).get("params") or {}
    tower = params.get("low_res_cfg", params)
    return tower.get("pixel_mean") is not None and tower.get("pixel_std") is not None


def check_processor_files(path: str | Path, cfg: ModelConfig, config: dict | None = None) -> dict:
    """Read a directory's preprocessor_config.json / processor_config.json (absent: {}) and check them against
    ``cfg``: input size, image tokens per ``<image_placeholder>``, image tag, and that images are not normalised
    twice (by the processor and by the towers of ``config``, the directory's config.json). Returns the image
    processor settings; ValueError naming the file and field on a mismatch."""
    d = Path(path)
    config = _read_config(d) if config is None else config
    image = json.loads((d / PREPROCESSOR_CONFIG).read_text()) if (d / PREPROCESSOR_CONFIG).is_file() else {}
    proc = json.loads((d / PROCESSOR_CONFIG).read_text()) if (d / PROCESSOR_CONFIG).is_file() else {}
    checks = [(PREPROCESSOR_CONFIG, "image_size", image.get("image_size", cfg.image_size), cfg.image_size),
              (PROCESSOR_CONFIG, "num_image_tokens", proc.get("num_image_tokens", cfg.image_tokens),
               cfg.image_tokens),
              (PROCESSOR_CONFIG, "image_tag", proc.get("image_tag", IMAGE_TAG), IMAGE_TAG)]
    for file, field, got, want in checks:
        if got != want:
            raise ValueError(f"{d / file}: {field} = {got!r}, the model needs {want!r}")
    if image.get("do_normalize", False) and _config_tower_normalises(config):
        raise ValueError(f"{d / PREPROCESSOR_CONFIG}: do_normalize is true and the vision config's towers normalise "
                         f"too (pixel_mean / pixel_std): images would be normalised twice")
    return image


# ----------------------------------------------------------------------------------------------------------------
# Reading DeepSeek-VL checkpoints


def _open_weights(d: Path) -> TensorSource:
    """safetensors (single / sharded) via ``TensorSource.open``; also ``pytorch_model.bin.index.json`` shards."""
    bin_index = d / "pytorch_model.bin.index.json"
    if not (d / HF_INDEX).is_file() and not (d / HF_WEIGHTS).is_file() and bin_index.is_file():
        weight_map = json.loads(bin_index.read_text())["weight_map"]
        merged: dict[str, torch.Tensor] = {}
        for f in sorted(set(weight_map.values())):
            merged.update(torch_load_state(d / f))
        return TensorSource.from_state_dict(merged, str(d))
    return TensorSource.open(d)


def _ignorable(k: str) -> bool:
    return (k.startswith(DS_LAYER_NORMS) or k.endswith("rotary_emb.inv_freq")
            or k.startswith((DS_LOW + "attn_pool.", DS_SINGLE + "attn_pool.")))


def _language_config(config: dict) -> dict:
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


def deepseek_vl_model_dict(config: dict, shapes: Mapping[str, tuple[int, ...]], origin: str = "checkpoint",
                           image_processor: Mapping[str, Any] | None = None) -> dict:
    """Our ``model`` config section for a DeepSeek-VL checkpoint, from its config.json and tensor shapes.

    LLM sizes come from ``language_config`` (LlamaConfig defaults fill absent fields) and are checked against the
    shapes; tower sizes come from the shapes, heads (and SAM windows when the shapes are ambiguous) from the
    ``model_name`` tables or our ``vlpretrain_model`` entry when present (which also gives name, image token id,
    init std and ``interp_size``). SigLIP's mean / std come from its tower params when it normalises, else from
    ``image_processor`` (the directory's preprocessor_config.json: the released 1.3B normalises there; identity
    when it does not), else SigLIP's 0.5 / 0.5."""
    def fail(msg: str):
        raise ValueError(f"{origin}: {msg}")

    def shape(k: str) -> tuple[int, ...]:
        if k not in shapes:
            fail(f"missing tensor {k}")
        return tuple(shapes[k])

    if config.get("model_type") != "multi_modality":
        fail(f"model_type = {config.get('model_type')!r}, expected 'multi_modality' (a DeepSeek-VL checkpoint)")
    hint = config.get(HINT_KEY) or {}
    vision = config.get("vision_config") or {}
    params = vision.get("params") or {}
    cls = vision.get("cls", "")
    if "HybridVisionTower" in cls:
        hybrid, low_cfg, high_cfg = True, params.get("low_res_cfg") or {}, params.get("high_res_cfg") or {}
    elif "CLIPVisionTower" in cls:
        hybrid, low_cfg, high_cfg = False, params, {}
        if not str(params.get("model_name", "siglip")).startswith("siglip"):
            fail(f"vision tower {params.get('model_name')!r} is not supported (SigLIP or the hybrid tower only)")
    else:
        fail(f"vision_config.cls = {cls!r}, expected HybridVisionTower or CLIPVisionTower")

    # language model
    lang = _language_config(config)
    llm = DS_LLM + "model."
    vocab, dim = shape(llm + "embed_tokens.weight")
    n_layers = _count(shapes, llm + "layers.")
    heads = lang["num_attention_heads"]
    head_dim = dim // heads
    derived = {"vocab_size": vocab, "hidden_size": dim, "num_hidden_layers": n_layers,
               "intermediate_size": shape(llm + "layers.0.mlp.gate_proj.weight")[0] if n_layers else None,
               "num_key_value_heads": shape(llm + "layers.0.self_attn.k_proj.weight")[0] // head_dim
               if n_layers else None}
    for field, got in derived.items():
        if lang[field] != got:
            fail(f"language_config.{field} = {lang[field]} but the weights give {got}")
    rope_theta, rope_type = rope_settings(lang)  # v4 rope_theta / rope_scaling or v5 rope_parameters
    if rope_type != "default":
        fail(f"language_config rope type {rope_type!r} is not supported (no rope scaling here)")
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

    # SigLIP
    low = DS_LOW if hybrid else DS_SINGLE
    hs = hint.get("siglip") or {}
    width, _, patch, _ = shape(low + "patch_embed.proj.weight")
    depth = _count(shapes, low + "blocks.")
    name = str(low_cfg.get("model_name", ""))
    sig_heads = hs.get("heads", SIGLIP_MODEL_NAMES.get(name, {}).get("heads"))
    if sig_heads is None:
        fail(f"cannot tell the SigLIP heads: unknown model_name {name!r} and no {HINT_KEY} entry")
    image_size = int(low_cfg.get("image_size", 384))
    if shape(low + "pos_embed") != (1, (image_size // patch) ** 2, width):
        fail(f"SigLIP pos_embed {shape(low + 'pos_embed')} does not fit image_size {image_size} / patch {patch}")
    siglip = {"image_size": image_size, "patch_size": patch, "width": width, "depth": depth, "heads": sig_heads,
              "mlp_ratio": shape(low + "blocks.0.mlp.fc1.weight")[0] / width if depth else 4.0,
              **_siglip_norm(low_cfg, image_processor)}
    model["siglip"] = siglip

    # aligner
    aligner = (config.get("aligner_config") or {}).get("params") or {}
    ptype = aligner.get("projector_type")
    want = "low_high_hybrid_split_mlp_gelu" if hybrid else "mlp_gelu"
    if ptype != want:
        fail(f"aligner_config.params.projector_type = {ptype!r}, expected {want!r} for a {cls}")
    if aligner.get("depth", 2) != 2:
        fail(f"aligner_config.params.depth = {aligner.get('depth')}, only 2 is supported")

    # SAM
    if not hybrid:
        model["sam"] = {"enabled": False}
        return model
    ha = hint.get("sam") or {}
    name = str(high_cfg.get("model_name", ""))
    table = SAM_MODEL_NAMES.get(name, {})
    width, _, patch, _ = shape(DS_HIGH + "patch_embed.proj.weight")
    depth = _count(shapes, DS_HIGH + "blocks.")
    image_size = int(high_cfg.get("image_size", 1024))
    grid = image_size // patch
    if shape(DS_HIGH + "pos_embed") != (1, grid, grid, width):
        fail(f"SAM pos_embed {shape(DS_HIGH + 'pos_embed')} does not fit image_size {image_size} / patch {patch}")
    if depth and shape(DS_HIGH + "blocks.0.mlp.lin1.weight")[0] != 4 * width:
        fail("SAM mlp ratio is not 4 (the only one timm's samvit builds here)")
    sizes = [(shape(DS_HIGH + f"blocks.{i}.attn.rel_pos_h")[0] + 1) // 2 for i in range(depth)]
    windowed = sorted({s for s in sizes if s != grid})
    if len(windowed) == 1 and grid in sizes:  # unambiguous: global blocks see the whole grid
        window_size, global_idx = windowed[0], [i for i, s in enumerate(sizes) if s == grid]
    else:
        window_size = ha.get("window_size", table.get("window_size"))
        global_idx = ha.get("global_attn_indexes", table.get("global_attn_indexes"))
        if window_size is None or global_idx is None:
            fail(f"cannot tell SAM's window size / global blocks from the weights, unknown model_name {name!r} "
                 f"and no {HINT_KEY} entry")
    sam_heads = ha.get("heads", table.get("heads"))
    if sam_heads is None:
        fail(f"cannot tell the SAM heads: unknown model_name {name!r} and no {HINT_KEY} entry")
    n_down = _count(shapes, DS_HIGH + "downsamples.")
    down = [shape(DS_HIGH + f"downsamples.{i}.weight")[0] for i in range(n_down)]
    sig_grid = siglip["image_size"] // siglip["patch_size"]
    sam = {"enabled": True, "image_size": image_size, "patch_size": patch, "width": width, "depth": depth,
           "heads": sam_heads, "window_size": window_size, "global_attn_indexes": list(global_idx),
           "neck_chans": shape(DS_HIGH + "neck.0.weight")[0],
           "interp_size": ha.get("interp_size", sig_grid * 2 ** n_down),
           "downsample_channels": down, "hd_path": DS_HIGH + "neck_hd.0.weight" in shapes,
           "mean": [float(x) for x in high_cfg.get("pixel_mean", ModelConfig().sam.mean)],
           "std": [float(x) for x in high_cfg.get("pixel_std", ModelConfig().sam.std)]}
    model["sam"] = sam
    return model


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


def _read_image_processor(d: Path) -> dict | None:
    f = d / PREPROCESSOR_CONFIG
    return json.loads(f.read_text()) if f.is_file() else None


def model_config_from_dict(model: dict) -> ModelConfig:
    """A checked ModelConfig from a ``model`` section (via ``config_from_dict``)."""
    seq = max(int(model.get("max_seq_len", 4096)), 2)
    return config_from_dict({"model": model, "train": {"seq_len": seq}}).model


def _read_config(d: Path) -> dict:
    f = d / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{d}: no config.json (expected a DeepSeek-VL model directory)")
    return json.loads(f.read_text())


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
    config = _read_config(d)
    src = _open_weights(d)
    shapes = {k: src.shape(k) for k in src.keys()}
    model = deepseek_vl_model_dict(config, shapes, str(d), _read_image_processor(d))
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


def load_deepseek_vl(model: nn.Module, path: str | Path) -> dict:
    """Load a DeepSeek-VL directory into ``model`` (whole model or one pipeline stage): the checkpoint's config
    and every shape are checked against ``model.cfg`` before anything is copied (ValueError naming the first
    mismatch); tensors are read and copied one at a time. Returns a report (loaded / ignored / skipped / model)."""
    d = Path(path)
    cfg: ModelConfig = model.cfg
    config = _read_config(d)
    src = _open_weights(d)
    shapes = {k: src.shape(k) for k in src.keys()}
    derived = deepseek_vl_model_dict(config, shapes, str(d), _read_image_processor(d))
    check_hf_llm_config(_language_config(config), cfg, f"{d / 'config.json'} (language_config)")
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
