"""Typed configuration: dataclasses are the single source of defaults.

A config is built from YAML files (``include:`` composes files, later keys win) plus ``--set key=value``
overrides, then checked field by field: unknown keys, wrong types and impossible values raise
``ConfigError`` with one line naming the key, before any expensive work starts.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from vlpretrain.errors import UserError
from vlpretrain.layout_rules import microbatch_problem, schedule_problem, split_problem


class ConfigError(UserError, ValueError):
    """A bad config: the message is one line (``config error: <key>: ...``) that names the offending key."""

    def __init__(self, msg: str = ""):
        super().__init__(re.sub(r"\s*\n\s*", " ", str(msg)).strip())  # one line, whatever was interpolated


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"))


def _yaml_load(text: str, where: str, prefix: str = ""):
    """Parse YAML with ``_Loader``; a key repeated in one mapping is an error (yaml keeps the last silently)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, where, prefix, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicate_keys(node: yaml.Node, where: str, prefix: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: already checked (and recursive anchors terminate)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge" or not isinstance(k, yaml.ScalarNode):
                continue  # ``<<: *base`` merges may be overridden by design
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            if k.value in lines:
                line = k.start_mark.line + 1
                at = f"line {line}" if line == lines[k.value] else f"lines {lines[k.value]} and {line}"
                raise ConfigError(f"config error: {where}: duplicate key '{key}' ({at})")
            lines[k.value] = k.start_mark.line + 1
            _check_duplicate_keys(v, where, key, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _check_duplicate_keys(v, where, f"{prefix}[{i}]", seen)


def _f(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field with value rules that ``validate`` checks for every config (declared next to the
    default, so the dataclasses stay the one source of both): ``ge gt le lt`` bound a number or each number of
    a list; ``len`` is a list's exact length; ``nonempty`` a string or list."""
    assert set(rules) <= {"ge", "gt", "le", "lt", "len", "nonempty"}, rules
    return field(default=default, default_factory=factory, metadata=rules)


# ----------------------------------------------------------------------------------------------------------------
# Model


@dataclass
class SigLIPConfig:
    """timm VisionTransformer (``vit_large_patch16_siglip_384`` at real size), no pooling head."""

    image_size: int = _f(384, ge=1)
    patch_size: int = _f(16, ge=1)
    width: int = _f(1024, ge=1)
    depth: int = _f(24, ge=1)
    heads: int = _f(16, ge=1)
    mlp_ratio: float = _f(4.0, gt=0)
    mean: list[float] = _f(factory=lambda: [0.5, 0.5, 0.5], len=3, ge=0, le=1)
    std: list[float] = _f(factory=lambda: [0.5, 0.5, 0.5], len=3, gt=0)


@dataclass
class SAMConfig:
    """timm VisionTransformerSAM (``samvit_base_patch16``) + DeepSeek-VL's interpolate/downsample tail."""

    enabled: bool = True
    image_size: int = _f(1024, ge=1)
    patch_size: int = _f(16, ge=1)
    width: int = _f(768, ge=1)
    depth: int = _f(12, ge=1)
    heads: int = _f(12, ge=1)
    window_size: int = _f(14, ge=1)
    global_attn_indexes: list[int] = _f(factory=lambda: [2, 5, 8, 11], ge=0)  # and < depth (validate)
    neck_chans: int = _f(256, ge=1)
    # the neck output (64x64 at real size) is bilinearly resized to this grid before the stride-2 convs
    interp_size: int = _f(96, ge=1)
    downsample_channels: list[int] = _f(factory=lambda: [512, 1024], nonempty=True, ge=1)
    # DeepSeek-VL's ``neck_hd`` side path from the first global-attention block, scaled by a learned scalar
    hd_path: bool = False
    mean: list[float] = _f(factory=lambda: [0.48145466, 0.4578275, 0.40821073], len=3, ge=0, le=1)
    std: list[float] = _f(factory=lambda: [0.26862954, 0.26130258, 0.27577711], len=3, gt=0)


@dataclass
class ModelConfig:
    name: str = "custom"
    # LLaMA-style decoder
    vocab_size: int = _f(102400, ge=1)
    dim: int = _f(4096, ge=1)
    n_layers: int = _f(30, ge=1)
    n_heads: int = _f(32, ge=1)
    n_kv_heads: Optional[int] = _f(None, ge=1)  # None: multi-head attention (n_kv_heads = n_heads)
    ffn_dim: int = _f(11008, ge=1)
    norm_eps: float = _f(1e-6, gt=0)
    rope_theta: float = _f(10000.0, gt=0)
    max_seq_len: int = _f(4096, ge=1)
    init_std: float = _f(0.02, gt=0)
    # attention of packed rows (document-causal): "flex" = FlexAttention with a block mask built from the
    # document ids (compiled; no CPU backward), "varlen" = per-document flash attention (cu_seqlens), "sdpa_mask"
    # = SDPA with a dense (B, 1, S, S) mask; "auto" = flex on GPU; on CPU sdpa_mask up to 1024 tokens per row,
    # varlen above (models/attention.py). Unpacked rows: plain causal.
    attention: Literal["auto", "flex", "varlen", "sdpa_mask"] = "auto"
    # decoder block implementation: "torch" (models/llm.py) or "te" (transformer-engine modules, GPU only)
    impl: Literal["torch", "te"] = "torch"
    # vision side
    siglip: SigLIPConfig = field(default_factory=SigLIPConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    image_token_id: int = _f(100015, ge=0)  # id of <image_placeholder> in the tokenizer (< vocab_size)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def image_tokens(self) -> int:
        """Token positions one image occupies (576 at real size)."""
        grid = self.siglip.image_size // self.siglip.patch_size
        return grid * grid

    @property
    def image_size(self) -> int:
        """Resolution the preprocessor delivers: SAM's when the hybrid tower is on, else SigLIP's."""
        return self.sam.image_size if self.sam.enabled else self.siglip.image_size


# ----------------------------------------------------------------------------------------------------------------
# Parallel layout, training stage, data, checkpoints, logging


@dataclass
class ParallelConfig:
    dp: Union[int, Literal["auto"]] = _f("auto", ge=1)
    tp: int = _f(1, ge=1)
    pp: int = _f(1, ge=1)
    vpp: int = _f(1, ge=1)  # virtual pipeline stages per pipeline rank
    schedule: Literal["1f1b", "interleaved_1f1b", "gpipe", "zero_bubble", "zbv", "dualpipev"] = "1f1b"
    sequence_parallel: bool = False
    layer_split: Union[Literal["uniform", "auto"], list[int]] = _f("auto", ge=0)
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    # free a unit's gathered parameters after forward (ZeRO-3) or keep them to backward (ZeRO-2); auto: free
    # only units of at least fsdp_keep_gathered_below_mb (compute dtype). Units kept gathered also stay gathered
    # across a step's microbatches: small units' all-gathers are latency, not memory (DeepSpeed's persistence
    # threshold)
    fsdp_reshard_after_forward: Union[bool, Literal["auto"]] = "auto"
    fsdp_keep_gathered_below_mb: float = _f(32.0, ge=0)
    # the first stage's images: "images" splits them across the TP group (each rank encodes its share, the
    # adaptor outputs are all-gathered); "replicate" recomputes every image on every TP rank (the paper)
    vision_split: Literal["images", "replicate"] = "images"
    # bound on every process-group wait and collective, seconds (0: VLP_PG_TIMEOUT_S, else 600); a timeout
    # names the ranks that are missing
    timeout_s: float = _f(0.0, ge=0)
    # FP8 matmuls through transformer-engine (model.impl: te, Hopper or newer): delayed or current scaling
    fp8: bool = False
    fp8_recipe: Literal["delayed", "current"] = "delayed"


@dataclass
class LanguageRatioConfig:
    """Share of language-only global steps: warms down from ``start`` to ``end`` (paper: 1.0 -> 0.7)."""

    start: float = _f(1.0, ge=0, le=1)
    end: float = _f(0.7, ge=0, le=1)
    warmup_steps: int = _f(0, ge=0)
    shape: Literal["linear", "cosine", "step"] = "linear"


@dataclass
class SourceConfig:
    name: str = ""
    path: str = _f("", nonempty=True)  # shards (dir / glob / brace pattern), corpus prefix (.bin/.idx) or .jsonl; relative to root
    # auto: from the files (data/formats.py); webdataset / llava / parquet: read as users have them (README)
    type: Literal["auto", "shards", "indexed", "jsonl", "webdataset", "llava", "parquet"] = "auto"
    modality: Literal["text", "multimodal"] = "multimodal"
    category: str = ""
    weight: float = _f(1.0, gt=0)
    image_root: str = ""  # llava / parquet: folder image paths are relative to (default: the data file's folder)
    image_column: str = ""  # parquet: default the first of image, images, jpg, png, img
    text_column: str = ""  # parquet: default the first of conversations, conversation, text, caption, txt


@dataclass
class DataConfig:
    root: str = "demo_data"
    tokenizer: str = _f("tokenizer.json", nonempty=True)  # relative to root unless absolute
    manifest: str = ""  # a YAML file listing the sources (relative to root); else data.sources
    sources: list[SourceConfig] = field(default_factory=list)
    group_by_modality: bool = True
    packing: bool = False  # pack several samples per sequence (stage 2); positions restart per document
    document_causal: bool = True  # with packing: no attention across packed documents
    language_ratio: LanguageRatioConfig = field(default_factory=LanguageRatioConfig)
    system_prompt: str = ""
    num_workers: int = _f(0, ge=0)  # DataLoader worker processes (each prepares whole steps)
    prefetch_steps: int = _f(2, ge=1)


@dataclass
class PretrainedConfig:
    """Local pretrained weights for stage 1 (later stages use ``train.init_from``)."""

    llm: str = ""  # HF LLaMA / DeepSeek-LLM directory (config.json + safetensors)
    siglip: str = ""  # timm ViT state dict (safetensors or torch file)
    sam: str = ""  # segment-anything / timm samvit / DeepSeek-VL state dict


@dataclass
class ProfileConfig:
    """torch.profiler over a window of steps: a Chrome trace per rank and a pipeline timeline in
    ``<run_dir>/profile`` (train/profiling.py)."""

    steps: list[int] = _f(factory=list, ge=1)  # [first, last], inclusive; empty: off


@dataclass
class TrainConfig:
    stage: Literal[1, 2, 3] = 1
    # which parts learn; empty = the paper's choice for the stage (S1 adaptor; S2 + llm; S3 + siglip)
    trainable: list[Literal["siglip", "sam", "adaptor", "llm"]] = field(default_factory=list)
    steps: int = _f(100, ge=1)
    global_batch_size: int = _f(8, ge=1)
    micro_batch_size: int = _f(8, ge=1)
    seq_len: int = _f(4096, ge=1)
    seed: int = _f(0, ge=0)
    lr: float = _f(1e-3, gt=0)
    min_lr_ratio: float = _f(0.1, ge=0, le=1)  # cosine floor, as a fraction of lr
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = _f(0, ge=0)
    step_milestones: list[float] = _f(factory=lambda: [0.8, 0.9], gt=0, lt=1)  # fractions of steps
    step_gamma: float = _f(0.316, gt=0, le=1)  # LR multiplier at each milestone (DeepSeek-LLM: 31.6%, then 10%)
    weight_decay: float = _f(0.0, ge=0)
    beta1: float = _f(0.9, ge=0, lt=1)
    beta2: float = _f(0.95, ge=0, lt=1)
    eps: float = _f(1e-8, gt=0)
    grad_clip: float = _f(1.0, ge=0)  # 0 disables clipping
    # auto: bf16 on GPU, fp32 on CPU. bf16 = one policy in every layout: bf16 compute, fp32 master weights,
    # optimizer state and gradient reduction (FSDP2's MixedPrecisionPolicy, over a 1-rank mesh at dp = 1)
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    compile: Union[bool, Literal["auto"]] = "auto"  # torch.compile each decoder block; auto: on GPU only
    device: Literal["auto", "cpu", "cuda"] = "auto"
    init_from: str = ""  # weights of a previous stage (checkpoint dir or .safetensors file)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    run_dir: str = _f("runs/default", nonempty=True)
    eval_interval: int = _f(0, ge=0)  # 0: only at the end
    eval_file: str = ""  # multi-choice eval set (jsonl), relative to data.root
    eval_text: str = ""  # held-out text (JSONL with "text", or a .bin/.idx prefix): bits per byte, perplexity
    # preemption: these signals (and a first Ctrl-C) make every rank save at the end of the step and exit 42
    preempt_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP"]] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    # seconds; > 0: save and exit 42 before it runs out (a Slurm job's end counts too)
    max_wall_time: float = _f(0.0, ge=0)
    # kept for the last save before a deadline; 0: 2 x slowest step + 2 x slowest save
    exit_margin_s: float = _f(0.0, ge=0)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class CheckpointConfig:
    interval: int = _f(0, ge=0)  # 0: only at the end
    dir: str = ""  # empty: <run_dir>/checkpoints
    keep_last: int = _f(2, ge=1)
    resume: str = ""  # "auto": the newest good checkpoint in dir (none: start fresh); or a checkpoint path
    async_save: bool = False  # write interval checkpoints in the background while training continues


@dataclass
class LoggingConfig:
    log_interval: int = _f(1, ge=1)
    peak_tflops: float = _f(0.0, ge=0)  # per device; 0: guess from the device (H100/A100 bf16), CPU default 1.0
    wandb: bool = False
    wandb_project: str = "vlpretrain"
    tensorboard: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


STAGE_TRAINABLE = {1: ["adaptor"], 2: ["adaptor", "llm"], 3: ["adaptor", "llm", "siglip"]}


def trainable_parts(cfg: Config) -> list[str]:
    return list(cfg.train.trainable) or STAGE_TRAINABLE[cfg.train.stage]


# ----------------------------------------------------------------------------------------------------------------
# Typed construction from plain dicts


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config error: {key}: expected a mapping, got {type(value).__name__}")
        return build_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config error: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise ConfigError(f"config error: {key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config error: {key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config error: {key}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    raise ConfigError(f"config error: {key}: expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"config error: unknown key '{key}'")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}" if mark is not None else problem


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if not path.is_file():
        where = f" (included from {seen[-1]})" if seen else ""
        raise ConfigError(f"config error: file not found: {path}{where}")
    if path in seen:
        raise ConfigError(f"config error: include cycle at {path}")
    try:
        data = _yaml_load(path.read_text(), str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: {path}: invalid YAML ({_yaml_error(e)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config error: {path}: cannot read ({type(e).__name__}: {e})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping, got {type(data).__name__}")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError(f"config error: {path}: include must be a file name or a list of file names, "
                          f"got {includes!r}")
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, seen + (path,)))
    return _deep_merge(merged, data)


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-4", "parallel.tp=2"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config error: override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw, f"override '{key}'", key.strip()) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error: override '{key}' conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = _read_yaml(Path(path)) if path else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    cfg = build_dataclass(Config, data)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = build_dataclass(Config, data)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Value checks (layout checks that need the world size live in parallel/)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config error: {key}: {msg}")


def _problem(found: tuple[str, str] | None) -> None:
    """Raise the (key, message) a layout rule of layout_rules.py found, if any."""
    if found is not None:
        _check(False, *found)


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _bounds_text(rules: dict) -> str:
    low = next(((op, rules[op]) for op in ("ge", "gt") if op in rules), None)
    high = next(((op, rules[op]) for op in ("le", "lt") if op in rules), None)
    if low and high:
        return f"must lie in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    op, bound = low or high
    return f"must be {_BOUNDS[op][0]} {bound}"


def check_rules(obj: Any, prefix: str = "") -> None:
    """Check every field's declared rules (``_f(..., ge=1)``), recursing into sections and lists of them."""
    for f in dataclasses.fields(obj):
        key, value, rules = f"{prefix}.{f.name}" if prefix else f.name, getattr(obj, f.name), f.metadata
        if dataclasses.is_dataclass(value):
            check_rules(value, key)
            continue
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_rules(item, f"{key}[{i}]")
            continue
        if rules.get("nonempty") and isinstance(value, (str, list)):
            _check(len(value) > 0, key, "must not be empty")
        if "len" in rules and isinstance(value, list):
            _check(len(value) == rules["len"], key, f"needs {rules['len']} values, got {len(value)}")
        bounds = {op: b for op, b in rules.items() if op in _BOUNDS}
        if not bounds:
            continue
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for k, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):  # not None, not 'auto'
                _check(all(_BOUNDS[op][1](v, b) for op, b in bounds.items()), k,
                       f"{_bounds_text(bounds)}, got {v}")


def validate(cfg: Config) -> None:
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    check_rules(cfg)  # ranges first: the checks below divide by these values
    _check(m.dim % m.n_heads == 0, "model.dim", f"{m.dim} is not divisible by model.n_heads={m.n_heads}")
    _check(m.head_dim % 2 == 0, "model.dim", "head dim (dim / n_heads) must be even for rotary embeddings")
    _check(m.n_heads % m.kv_heads == 0, "model.n_kv_heads",
           f"{m.kv_heads} does not divide model.n_heads={m.n_heads}")
    _check(0 <= m.image_token_id < m.vocab_size, "model.image_token_id", f"{m.image_token_id} not in vocab")
    s = m.siglip
    _check(s.image_size % s.patch_size == 0, "model.siglip.image_size", "must be a multiple of patch_size")
    _check(s.width % s.heads == 0, "model.siglip.width", "must be divisible by heads")
    if m.sam.enabled:
        a = m.sam
        _check(a.image_size % a.patch_size == 0, "model.sam.image_size", "must be a multiple of patch_size")
        _check(a.width % a.heads == 0, "model.sam.width", "must be divisible by heads")
        _check(all(0 <= i < a.depth for i in a.global_attn_indexes), "model.sam.global_attn_indexes",
               f"indexes must lie in [0, {a.depth})")
        n_down = len(a.downsample_channels)
        _check(n_down >= 1, "model.sam.downsample_channels", "needs at least one conv")
        grid = a.interp_size
        for _ in range(n_down):
            grid = (grid - 1) // 2 + 1
        sig_grid = s.image_size // s.patch_size
        _check(grid == sig_grid, "model.sam.interp_size",
               f"{a.interp_size} halved {n_down} times gives a {grid}x{grid} grid, SigLIP gives {sig_grid}x{sig_grid}")
        _check(not a.hd_path or len(a.global_attn_indexes) > 0, "model.sam.hd_path",
               "needs a global-attention block")
    _check(t.seq_len <= m.max_seq_len, "train.seq_len", f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(t.seq_len > m.image_tokens, "train.seq_len",
           f"{t.seq_len} cannot hold one image ({m.image_tokens} tokens) and text")
    _check(not t.profile.steps or (len(t.profile.steps) == 2 and t.profile.steps[0] <= t.profile.steps[1]
                                   <= t.steps), "train.profile.steps",
           f"needs [first, last] with first <= last <= train.steps={t.steps}, got {t.profile.steps}")
    _check(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}")
    if not m.sam.enabled:
        _check("sam" not in t.trainable, "train.trainable", "'sam' is trainable but model.sam.enabled is false")
    names: dict[str, int] = {}
    for i, src in enumerate(d.sources):  # a source's name defaults to its path (data/sources.py)
        name = src.name or src.path
        _check(name not in names, f"data.sources[{i}].name",
               f"'{name}' is already the name of data.sources[{names.get(name)}]")
        names[name] = i
    if isinstance(p.layer_split, list):
        bad = split_problem(p.layer_split, m.n_layers, p.pp * p.vpp)
        _check(bad is None, "parallel.layer_split", bad or "")
    # name the key the user most likely set: pp alone, or vpp on top of it
    _check(p.pp * p.vpp <= m.n_layers + 2, "parallel.vpp" if p.vpp > 1 else "parallel.pp",
           f"pp x vpp = {p.pp * p.vpp} virtual stages exceed the {m.n_layers + 2} model parts "
           f"(embed, {m.n_layers} layers, head)")
    _check(m.n_heads % p.tp == 0 and m.kv_heads % p.tp == 0, "parallel.tp",
           f"{p.tp} does not divide the attention heads ({m.n_heads} q, {m.kv_heads} kv)")
    _check(m.ffn_dim % p.tp == 0, "parallel.tp", f"{p.tp} does not divide model.ffn_dim={m.ffn_dim}")
    _check(m.vocab_size % p.tp == 0, "parallel.tp", f"{p.tp} does not divide model.vocab_size={m.vocab_size}")
    _problem(schedule_problem(p.schedule, p.pp, p.vpp))  # the schedule table (layout_rules.py)
    if isinstance(p.dp, int):  # (dp: auto is checked with the world size, by mesh.resolve_layout)
        _problem(microbatch_problem(t.global_batch_size, t.micro_batch_size, p.dp, p.pp, p.vpp, p.schedule))
    # transformer-engine (models/te.py): FP8 runs through it; it composes with dp (FSDP2) and pp, not with our TP
    _check(not p.fp8 or m.impl == "te", "parallel.fp8", "FP8 runs through transformer-engine: set model.impl=te")
    _check(m.impl != "te" or p.tp == 1, "parallel.tp",
           f"model.impl=te needs tp=1, got {p.tp}: our TP shards nn.Linear weights as DTensors, and TE's own TP "
           "groups would leave plain local shards that DCP cannot reshard on a layout-change resume; use dp/pp, "
           "or model.impl=torch")
    _check(not p.fp8 or all(n % 16 == 0 for n in (m.dim, m.ffn_dim, m.kv_heads * m.head_dim)), "parallel.fp8",
           f"FP8 GEMMs need model.dim, model.ffn_dim and the kv width divisible by 16, got {m.dim}, {m.ffn_dim}, "
           f"{m.kv_heads * m.head_dim}")
