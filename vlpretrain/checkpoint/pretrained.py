"""Load pretrained parts from local files into ``DeepSeekVL``.

    load_hf_llm(model, dir)     HF LLaMA / DeepSeek-LLM directory (config.json + safetensors, single or sharded)
    load_siglip(model, path)    timm ViT state dict (SigLIP), any common key prefix
    load_sam(model, path)       segment-anything / timm samvit / DeepSeek-VL high-res tower state dict
    load_pretrained_parts(model, llm=, siglip=, sam=)

Every loader checks the whole checkpoint first (missing keys, unexpected keys, shapes) and only then copies,
so a failed load leaves the model untouched. Tensors are read lazily from safetensors (``safe_open``), one at a
time, and copied with ``param.copy_()`` under ``no_grad`` (which also casts to the parameter's dtype), so a 7B
load never holds a second copy of the model. Parameters owned by parts a pipeline stage dropped (``embed`` /
``head`` set to None, missing ``layers.<i>``) are skipped and counted in the report.

Each loader returns a report dict: ``loaded`` (tensors copied), ``ignored`` (checkpoint keys deliberately
dropped), ``skipped`` (loadable keys whose parameter this stage does not own) and, for the vision towers,
``not_in_checkpoint`` (our parameters the checkpoint does not have and that keep their init) and
``prefix`` (the key prefix that was stripped).

Checkpoint names map to ours through the key maps of ``models/state_dict_adapter.py``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vlpretrain.checkpoint.paths import WEIGHTS, WEIGHTS_INDEX
from vlpretrain.checkpoint.sharded_weights import load_local_
from vlpretrain.config import ModelConfig
from vlpretrain.models.state_dict_adapter import (
    DEEPSEEK_VL_SAM_PREFIXES,
    DEEPSEEK_VL_SIGLIP_PREFIXES,
    SAM_PREFIX,
    SAM_VIT_PREFIX,
    SIGLIP_PREFIX,
    hf_llama_key_map,
    sam_key_to_ours,
    siglip_key_to_ours,
)

_VIT_ANCHOR = "patch_embed.proj.weight"


# ----------------------------------------------------------------------------------------------------------------
# Reading tensors lazily


class TensorSource:
    """Read-only view over checkpoint tensors: names, shapes without loading, and one tensor at a time.

    safetensors files (one, or the shards named by an index) are opened with ``safe_open`` and read per tensor;
    torch files are loaded with ``weights_only=True`` (memory-mapped when the format allows).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]],
                 reader: Callable[[str, tuple[slice, ...] | None], torch.Tensor], origin: str):
        self._shapes = shapes
        self._read = reader
        self.origin = origin

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        return self._read(key, None)

    def read(self, key: str, region: tuple[slice, ...] | None) -> torch.Tensor:
        """Tensor ``key`` sliced by ``region`` (one slice per dim; None = whole): from safetensors only those
        bytes are read."""
        return self._read(key, region)

    # -- constructors --------------------------------------------------------------------------------------------

    @classmethod
    def from_safetensors(cls, files: list[Path], origin: str,
                         weight_map: dict[str, str] | None = None) -> TensorSource:
        shapes: dict[str, tuple[int, ...]] = {}
        where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for k in h.keys():
                    if k in where:
                        raise ValueError(f"{origin}: tensor {k} appears in both {where[k].name} and {f.name}")
                    shapes[k] = tuple(h.get_slice(k).get_shape())
                    where[k] = f
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(where))
            if missing:
                raise ValueError(f"{origin}: index names {len(missing)} tensors not found in the shards, "
                                 f"e.g. {missing[:3]}")

        def read(k: str, region: tuple[slice, ...] | None) -> torch.Tensor:
            # opened per tensor: the file's pages a read touched are unmapped right after, so resident memory
            # stays at what was copied out (a handle kept open would keep every page read so far mapped)
            with safe_open(str(where[k]), framework="pt", device="cpu") as h:
                return h.get_tensor(k) if region is None else h.get_slice(k)[region]
        return cls(shapes, read, origin)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], origin: str) -> TensorSource:
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            kind = type(state[bad[0]]).__name__
            raise ValueError(f"{origin}: not a state dict of tensors (e.g. {bad[0]!r} is a {kind})")
        return cls({k: tuple(v.shape) for k, v in state.items()},
                   lambda k, region: state[k] if region is None else state[k][region], origin)

    @classmethod
    def open(cls, path: str | Path) -> TensorSource:
        """A .safetensors file, a torch file (.pt/.pth/.bin), or a directory holding one of those or a
        sharded ``model.safetensors.index.json``."""
        p = Path(path)
        if p.is_dir():
            index = p / WEIGHTS_INDEX
            if index.is_file():
                return _open_sharded(index)
            if (p / WEIGHTS).is_file():
                return cls.from_safetensors([p / WEIGHTS], str(p / WEIGHTS))
            cands = sorted(p.glob("*.safetensors")) or sorted(
                [*p.glob("*.bin"), *p.glob("*.pth"), *p.glob("*.pt")])
            if len(cands) != 1:
                raise FileNotFoundError(f"{p}: expected one weights file (.safetensors/.bin/.pth/.pt) or a "
                                        f"model.safetensors.index.json, found {[c.name for c in cands]}")
            p = cands[0]
        if not p.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if p.name.endswith(".index.json"):
            return _open_sharded(p)
        if p.suffix == ".safetensors":
            return cls.from_safetensors([p], str(p))
        return cls.from_state_dict(torch_load_state(p), str(p))


def _open_sharded(index: Path) -> TensorSource:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({e})") from None
    files = sorted({index.parent / f for f in weight_map.values()})
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{index}: shards missing: {absent}")
    return TensorSource.from_safetensors(files, str(index.parent), weight_map)


def torch_load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    # unwrap {"state_dict": {...}} / {"model": {...}} style containers
    for _ in range(2):
        if isinstance(obj, dict) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model", "module", "model_state_dict"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Checking and copying


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by fully-qualified name (the Parameter objects themselves)."""
    return dict(model.state_dict(keep_vars=True))


def _fmt(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_shapes(src: TensorSource, plan: dict[str, str], own: dict[str, torch.Tensor], hint: str = "") -> None:
    for ck, ours in plan.items():
        if tuple(src.shape(ck)) != tuple(own[ours].shape):
            raise ValueError(f"{src.origin}: shape mismatch for {ck} -> {ours}: checkpoint {_fmt(src.shape(ck))}, "
                             f"model {_fmt(own[ours].shape)}{hint}")
        if own[ours].is_meta:
            raise ValueError(f"{ours} is on the meta device: materialise the model (to_empty + init_weights) "
                             "before loading weights")


@torch.no_grad()
def copy_checked(src: TensorSource, plan: dict[str, str], own: dict[str, torch.Tensor]) -> int:
    """Copy checkpoint tensor ``ck`` into parameter ``own[plan[ck]]``, one tensor at a time; a sharded
    parameter (TP / FSDP DTensor) reads only the slice of the tensor this rank holds."""
    for ck, ours in plan.items():
        load_local_(own[ours], lambda region, ck=ck: src.read(ck, region))  # copy_ casts dtype, moves device
    return len(plan)


def preview_keys(keys: list[str], n: int = 3) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ----------------------------------------------------------------------------------------------------------------
# LLM: HF LLaMA / DeepSeek-LLM


def rope_settings(hf: dict) -> tuple[float, str]:
    """(rope_theta, rope_type) from a v4 (``rope_theta`` + ``rope_scaling``) or v5 (``rope_parameters``) config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    rtype = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), str(rtype)


def check_hf_llm_config(hf: dict, cfg: ModelConfig, origin: str = "config.json") -> None:
    """Raise a one-line ValueError naming the first field of ``hf`` (a LLaMA config.json) that our
    ModelConfig does not match."""
    def fail(field: str, got, want: str) -> None:
        raise ValueError(f"{origin}: {field} = {got!r} does not match {want}")

    if hf.get("model_type", "llama") != "llama":
        fail("model_type", hf.get("model_type"), "'llama' (LLaMA / DeepSeek-LLM architecture)")
    heads = hf.get("num_attention_heads")
    ints = [("hidden_size", hf.get("hidden_size"), cfg.dim, "model.dim"),
            ("num_hidden_layers", hf.get("num_hidden_layers"), cfg.n_layers, "model.n_layers"),
            ("num_attention_heads", heads, cfg.n_heads, "model.n_heads"),
            ("num_key_value_heads", hf.get("num_key_value_heads", heads), cfg.kv_heads, "model.n_kv_heads"),
            ("intermediate_size", hf.get("intermediate_size"), cfg.ffn_dim, "model.ffn_dim"),
            ("vocab_size", hf.get("vocab_size"), cfg.vocab_size, "model.vocab_size")]
    for field, got, want, ours in ints:
        if got != want:
            fail(field, got, f"{ours}={want}")
    if hf.get("head_dim") is not None and hf["head_dim"] != cfg.head_dim:
        fail("head_dim", hf["head_dim"], f"model.dim / model.n_heads = {cfg.head_dim}")
    eps = hf.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, cfg.norm_eps, rel_tol=1e-6):
        fail("rms_norm_eps", eps, f"model.norm_eps={cfg.norm_eps}")
    theta, rtype = rope_settings(hf)
    if not math.isclose(theta, cfg.rope_theta, rel_tol=1e-9):
        fail("rope_theta", theta, f"model.rope_theta={cfg.rope_theta}")
    if rtype != "default":
        fail("rope_type", rtype, "'default' (rope scaling is not implemented)")
    if hf.get("tie_word_embeddings", False):
        fail("tie_word_embeddings", hf["tie_word_embeddings"], "false (our output head is untied)")
    if hf.get("hidden_act", "silu") != "silu":
        fail("hidden_act", hf["hidden_act"], "'silu' (SwiGLU)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            fail(field, hf[field], "false (our linears have no bias)")


def load_hf_llm(model: nn.Module, path: str | Path) -> dict:
    """Load a HF LLaMA / DeepSeek-LLM directory (config.json + model.safetensors or sharded safetensors with
    ``model.safetensors.index.json``) into the decoder: embeddings, blocks, final norm, output head."""
    d = Path(path)
    cfg: ModelConfig = model.cfg
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{d}: no config.json (expected a HF LLaMA model directory)")
    check_hf_llm_config(json.loads(cfg_file.read_text()), cfg, str(cfg_file))
    if (d / WEIGHTS_INDEX).is_file():
        src = _open_sharded(d / WEIGHTS_INDEX)
    elif (d / WEIGHTS).is_file():
        src = TensorSource.from_safetensors([d / WEIGHTS], str(d / WEIGHTS))
    else:
        raise FileNotFoundError(f"{d}: no {WEIGHTS} or {WEIGHTS_INDEX}")

    key_map = hf_llama_key_map(cfg.n_layers)
    ignored = sorted(k for k in src.keys() if k.endswith("rotary_emb.inv_freq"))
    unexpected = sorted(set(src.keys()) - set(key_map) - set(ignored))
    if unexpected:
        raise ValueError(f"{src.origin}: {len(unexpected)} unexpected tensors: {preview_keys(unexpected)}")
    missing = sorted(set(key_map) - set(src.keys()))
    if missing:
        raise ValueError(f"{src.origin}: missing {len(missing)} tensors: {preview_keys(missing)}")
    own = model_tensors(model)
    plan = {hf: ours for hf, ours in key_map.items() if ours in own}
    skipped = sorted(hf for hf, ours in key_map.items() if ours not in own)
    check_shapes(src, plan, own)
    return {"loaded": copy_checked(src, plan, own), "ignored": ignored, "skipped": skipped, "origin": src.origin}


# ----------------------------------------------------------------------------------------------------------------
# Vision towers


def _vit_prefixes(src: TensorSource, want_sam: bool) -> list[str]:
    """Prefixes under which ``src`` holds a ViT: a key ending in ``patch_embed.proj.weight``. SAM towers are
    told apart from plain ViTs by their neck."""
    out = []
    for k in src.keys():
        if k.endswith(_VIT_ANCHOR):
            p = k[: -len(_VIT_ANCHOR)]
            if (p + "neck.0.weight" in src) == want_sam:
                out.append(p)
    return sorted(set(out))


def _pick_prefix(src: TensorSource, want_sam: bool, preferred: tuple[str, ...], what: str) -> str:
    cands = _vit_prefixes(src, want_sam)
    for p in preferred:
        if p in cands:
            return p
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise ValueError(f"{src.origin}: no {what} tower found (no '*{_VIT_ANCHOR}' key"
                         f"{' with a neck' if want_sam else ' without a SAM neck'}); expected timm / "
                         f"{'segment-anything' if want_sam else 'open_clip'} / DeepSeek-VL naming")
    raise ValueError(f"{src.origin}: several {what} towers found under prefixes {cands}; extract one first")


def _vision_owner(model: nn.Module, part: str) -> bool:
    """False when this pipeline stage does not hold the vision towers; raise if the model has no such tower."""
    embed = getattr(model, "embed", None)
    if embed is None:
        return False
    if part == "sam" and embed.vision.sam is None:
        raise ValueError("model has no SAM tower (model.sam.enabled is false): cannot load a SAM checkpoint")
    return True


def _load_vision(model: nn.Module, src: TensorSource, prefix: str, rename: Callable[[str], str | None],
                 our_root: str, hint: str) -> dict:
    """Map every checkpoint key under ``prefix`` via ``rename`` (None = drop) and copy."""
    own = {k: v for k, v in model_tensors(model).items() if k.startswith(our_root)}
    plan: dict[str, str] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    for k in src.keys():
        if not k.startswith(prefix):
            continue
        ours = rename(k[len(prefix):])
        if ours is None:
            ignored.append(k)
        elif ours in own:
            plan[k] = ours
        else:
            unexpected.append(f"{k} -> {ours}")
    if unexpected:
        raise ValueError(f"{src.origin}: {len(unexpected)} checkpoint tensors have no place in the model: "
                         f"{preview_keys(unexpected)}{hint}")
    not_in_ckpt = sorted(set(own) - set(plan.values()))
    return {"plan": plan, "ignored": sorted(ignored), "not_in_checkpoint": not_in_ckpt, "own": own}


def load_siglip(model: nn.Module, path: str | Path) -> dict:
    """Load a timm ViT (SigLIP) state dict into ``embed.vision.siglip.vit``.

    Accepts timm names under any prefix (``visual.trunk.``, ``vision_tower.``, ``model.``, DeepSeek-VL's
    ``vision_model.vision_tower_low.vision_tower.``, ...); the pooling head (``attn_pool.*``, ``head.*``) is
    dropped. Every tower parameter must be in the checkpoint. Resolution changes are not resampled: a
    different pos_embed shape raises.
    """
    src = TensorSource.open(path)
    if not _vision_owner(model, "siglip"):
        return {"loaded": 0, "ignored": [], "skipped": ["embed (not on this pipeline stage)"],
                "not_in_checkpoint": [], "prefix": None, "origin": src.origin}
    prefix = _pick_prefix(src, False, DEEPSEEK_VL_SIGLIP_PREFIXES, "SigLIP/ViT")
    hint = " (depth, width or class token differ from model.siglip?)"
    r = _load_vision(model, src, prefix, siglip_key_to_ours, SIGLIP_PREFIX, hint)
    if r["not_in_checkpoint"]:
        raise ValueError(f"{src.origin}: missing {len(r['not_in_checkpoint'])} SigLIP tensors under prefix "
                         f"'{prefix}': {preview_keys(r['not_in_checkpoint'])}")
    check_shapes(src, r["plan"], r["own"], " (pos_embed resampling to another image_size/patch_size is "
                  "not supported: match model.siglip to the checkpoint)")
    return {"loaded": copy_checked(src, r["plan"], r["own"]), "ignored": r["ignored"], "skipped": [],
            "not_in_checkpoint": [], "prefix": prefix, "origin": src.origin}


def load_sam(model: nn.Module, path: str | Path) -> dict:
    """Load a SAM image encoder into ``embed.vision.sam``.

    Accepts segment-anything checkpoints (``image_encoder.`` prefix, ``mlp.lin1/lin2``; prompt encoder and
    mask decoder are not read), timm samvit names, and DeepSeek-VL's ``vision_model.vision_tower_high.
    vision_tower.`` which also holds ``neck_hd.*``, ``downsamples.*`` and ``hd_alpha_downsamples``. Every ViT
    and neck tensor must be present; the DeepSeek-VL tail may be absent (it keeps its init and is listed in
    ``not_in_checkpoint``). Resolution changes are not resampled: a different pos_embed/rel_pos shape raises.
    """
    src = TensorSource.open(path)
    if not _vision_owner(model, "sam"):
        return {"loaded": 0, "ignored": [], "skipped": ["embed (not on this pipeline stage)"],
                "not_in_checkpoint": [], "prefix": None, "origin": src.origin}
    prefix = _pick_prefix(src, True, DEEPSEEK_VL_SAM_PREFIXES, "SAM")

    def rename(k: str) -> str | None:
        return None if k.startswith("head.") else sam_key_to_ours(k)

    hint = (" (depth, width, global_attn_indexes, downsample_channels or model.sam.hd_path differ from the "
            "checkpoint?)")
    r = _load_vision(model, src, prefix, rename, SAM_PREFIX, hint)
    missing_vit = [k for k in r["not_in_checkpoint"] if k.startswith(SAM_VIT_PREFIX)]
    if missing_vit:
        raise ValueError(f"{src.origin}: missing {len(missing_vit)} SAM tensors under prefix '{prefix}': "
                         f"{preview_keys(missing_vit)}")
    check_shapes(src, r["plan"], r["own"], " (pos_embed / rel_pos resampling to another image_size, "
                  "patch_size or window_size is not supported: match model.sam to the checkpoint)")
    return {"loaded": copy_checked(src, r["plan"], r["own"]), "ignored": r["ignored"], "skipped": [],
            "not_in_checkpoint": r["not_in_checkpoint"], "prefix": prefix, "origin": src.origin}


def load_pretrained_parts(model: nn.Module, llm: str | Path | None = None, siglip: str | Path | None = None,
                          sam: str | Path | None = None) -> dict[str, dict]:
    """Load whichever parts are given; returns {part: report}. The adaptor is never loaded here."""
    reports: dict[str, dict] = {}
    if llm:
        reports["llm"] = load_hf_llm(model, llm)
    if siglip:
        reports["siglip"] = load_siglip(model, siglip)
    if sam:
        reports["sam"] = load_sam(model, sam)
    return reports
