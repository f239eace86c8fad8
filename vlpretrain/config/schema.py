"""The configuration's schema: typed dataclasses, one per concern, the single source of defaults.

Every field is declared with ``_f(default, <rules>, help=...)``: its range beside its default (checked by
``rules.check_rules`` for every config) and its one-line meaning (rendered into docs/configuration.md by
``vlpretrain.config_reference``). No I/O here: ``loading.py`` builds a ``Config`` from YAML and overrides.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


def _f(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, help: str = "",
       **rules: Any) -> Any:
    """A dataclass field with value rules that ``validate`` checks for every config (declared next to the
    default, so the dataclasses stay the one source of both): ``ge gt le lt`` bound a number or each number of
    a list; ``len`` is a list's exact length; ``nonempty`` a string or list. ``help`` is the key's one-line
    meaning, rendered into docs/configuration.md by ``vlpretrain.config_reference``."""
    assert set(rules) <= {"ge", "gt", "le", "lt", "len", "nonempty"}, rules
    return field(default=default, default_factory=factory, metadata={**rules, "help": help})


# ----------------------------------------------------------------------------------------------------------------
# Model


@dataclass
class SigLIPConfig:
    """timm VisionTransformer (``vit_large_patch16_siglip_384`` at real size), no pooling head."""

    image_size: int = _f(384, ge=1, help="input resolution in pixels (the image resized from SAM's size when hybrid)")
    patch_size: int = _f(16, ge=1, help="patch side in pixels; (image_size / patch_size)^2 tokens per image")
    width: int = _f(1024, ge=1, help="embedding width")
    depth: int = _f(24, ge=1, help="transformer blocks")
    heads: int = _f(16, ge=1, help="attention heads")
    mlp_ratio: float = _f(4.0, gt=0, help="MLP hidden width as a multiple of width")
    mean: list[float] = _f(factory=lambda: [0.5, 0.5, 0.5], len=3, ge=0, le=1,
                           help="per-channel mean the tower normalises its [0, 1] input with")
    std: list[float] = _f(factory=lambda: [0.5, 0.5, 0.5], len=3, gt=0,
                          help="per-channel std the tower normalises its [0, 1] input with")


@dataclass
class SAMConfig:
    """timm VisionTransformerSAM (``samvit_base_patch16``) + DeepSeek-VL's interpolate/downsample tail."""

    enabled: bool = _f(True, help="build the SAM-B high-resolution tower (the 7B's hybrid encoder); false: SigLIP only")
    image_size: int = _f(1024, ge=1, help="input resolution in pixels; the preprocessed image size when enabled")
    patch_size: int = _f(16, ge=1, help="patch side in pixels")
    width: int = _f(768, ge=1, help="embedding width")
    depth: int = _f(12, ge=1, help="transformer blocks")
    heads: int = _f(12, ge=1, help="attention heads")
    window_size: int = _f(14, ge=1, help="window side (patches) of the windowed-attention blocks")
    global_attn_indexes: list[int] = _f(factory=lambda: [2, 5, 8, 11], ge=0,
                                        help="blocks with global attention (each < depth)")
    neck_chans: int = _f(256, ge=1, help="channels of the neck output")
    interp_size: int = _f(96, ge=1, help="grid the neck output (64x64 at real size) is bilinearly resized to before "
                                         "the stride-2 convs; halved per conv it must give SigLIP's grid")
    downsample_channels: list[int] = _f(factory=lambda: [512, 1024], nonempty=True, ge=1,
                                        help="output channels of each stride-2 downsample conv")
    hd_path: bool = _f(False, help="DeepSeek-VL's neck_hd side path from the first global-attention block, scaled "
                                   "by a learned scalar (starts at 0)")
    mean: list[float] = _f(factory=lambda: [0.48145466, 0.4578275, 0.40821073], len=3, ge=0, le=1,
                           help="per-channel mean (CLIP's) the tower normalises its [0, 1] input with")
    std: list[float] = _f(factory=lambda: [0.26862954, 0.26130258, 0.27577711], len=3, gt=0,
                          help="per-channel std (CLIP's) the tower normalises its [0, 1] input with")


@dataclass
class ModelConfig:
    """The model: a LLaMA-style decoder, the vision towers and the image placeholder token."""

    name: str = _f("custom", help="a label in logs, `vlpretrain info` and `plan`")
    # LLaMA-style decoder
    vocab_size: int = _f(102400, ge=1, help="vocabulary size (embedding rows, output head width)")
    dim: int = _f(4096, ge=1, help="decoder hidden size")
    n_layers: int = _f(30, ge=1, help="decoder blocks")
    n_heads: int = _f(32, ge=1, help="query attention heads")
    n_kv_heads: int | None = _f(None, ge=1, help="key/value heads (grouped-query attention); null: n_heads")
    ffn_dim: int = _f(11008, ge=1, help="SwiGLU hidden size")
    norm_eps: float = _f(1e-6, gt=0, help="RMSNorm epsilon")
    rope_theta: float = _f(10000.0, gt=0, help="rotary embedding base")
    max_seq_len: int = _f(4096, ge=1, help="longest sequence (HF export: max_position_embeddings); train.seq_len <= it")
    init_std: float = _f(0.02, gt=0, help="std of the initial decoder and adaptor weights (residual outputs scaled "
                                          "down with depth)")
    # flex and varlen never build the S x S mask; on CPU flex has no backward, and one SDPA call per document costs
    # ~1 ms of dispatch, so auto keeps the small dense mask for short rows there (models/attention.py)
    attention: Literal["auto", "flex", "varlen", "sdpa_mask"] = _f(
        "auto", help="kernel for packed rows: flex (FlexAttention block mask), varlen (per document), sdpa_mask "
                     "(dense mask); auto: flex on GPU, on CPU sdpa_mask up to 1024 tokens per row, varlen above")
    impl: Literal["torch", "te"] = _f("torch", help="decoder blocks: torch, or te (transformer-engine modules, GPU "
                                                    "only)")
    # vision side
    siglip: SigLIPConfig = _f(factory=SigLIPConfig, help="the SigLIP tower (low resolution, semantics)")
    sam: SAMConfig = _f(factory=SAMConfig, help="the SAM tower (high resolution, detail)")
    image_token_id: int = _f(100015, ge=0, help="id of <image_placeholder> in the tokenizer (< vocab_size)")

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
    """The (pp, dp, tp) layout, the pipeline schedule and split, FSDP2 and FP8 settings."""

    dp: int | Literal["auto"] = _f("auto", ge=1, help="data-parallel (FSDP2) degree; auto: the world size / "
                                                           "(tp x pp)")
    dp_shard: int = _f(0, ge=0, help="HSDP: FSDP2 shards within groups of this many dp ranks and replicates across "
                                     "dp / dp_shard groups (one gradient all-reduce across them); 0: shard over "
                                     "all of dp")
    tp: int = _f(1, ge=1, help="tensor-parallel degree (decoder; the first stage's images split across it)")
    pp: int = _f(1, ge=1, help="pipeline-parallel degree (pipeline ranks)")
    vpp: int = _f(1, ge=1, help="virtual pipeline stages per pipeline rank (interleaved and V schedules)")
    schedule: Literal["1f1b", "interleaved_1f1b", "gpipe", "zero_bubble", "zbv", "dualpipev"] = _f(
        "1f1b", help="pipeline schedule (the table in layout_rules.py says which need vpp > 1 or a V placement)")
    sequence_parallel: bool = _f(False, help="sequence parallelism on the decoder's norms (their activations "
                                             "sharded over the sequence within the TP group)")
    layer_split: Literal["uniform", "auto"] | list[int] = _f(
        "auto", ge=0, help="decoder layers per virtual stage: uniform, auto (balanced over the step mix by the cost "
                           "model, as `vlpretrain plan` shows) or a list")
    activation_checkpointing: Literal["none", "selective", "full"] = _f(
        "none", help="recompute in backward: full (whole decoder blocks) or selective (keeps matmul and attention "
                     "outputs)")
    # small units' all-gathers are latency, not memory (DeepSpeed's persistence threshold), so auto keeps them
    # gathered from forward to backward and across a step's microbatches
    fsdp_reshard_after_forward: bool | Literal["auto"] = _f(
        "auto", help="free a unit's gathered parameters after forward (true, ZeRO-3) or keep them to backward (false, "
                     "ZeRO-2); auto: free only units of at least fsdp_keep_gathered_below_mb")
    fsdp_keep_gathered_below_mb: float = _f(32.0, ge=0, help="auto's threshold: units smaller than this (MiB in the "
                                                             "compute dtype) stay gathered")
    vision_split: Literal["images", "replicate"] = _f(
        "images", help="first stage under TP: images splits the images across the TP group (adaptor outputs "
                       "all-gathered); replicate recomputes every image on every TP rank (the paper)")
    timeout_s: float = _f(0.0, ge=0, help="bound in seconds on every process-group wait and collective (0: "
                                          "VLP_PG_TIMEOUT_S, else 600); a timeout names the missing ranks")
    fp8: bool = _f(False, help="FP8 matmuls through transformer-engine (needs model.impl: te; Hopper or newer)")
    fp8_recipe: Literal["delayed", "current"] = _f("delayed", help="FP8 scaling: delayed (amax history) or current")


@dataclass
class LanguageRatioConfig:
    """Share of language-only global steps: warms down from ``start`` to ``end`` (paper: 1.0 -> 0.7)."""

    start: float = _f(1.0, ge=0, le=1, help="language share of the steps at the first step")
    end: float = _f(0.7, ge=0, le=1, help="language share after the warm-up (the paper's 7:3)")
    warmup_steps: int = _f(0, ge=0, help="steps from start to end (0: end from the first step)")
    shape: Literal["linear", "cosine", "step"] = _f("linear", help="how the share moves from start to end")


@dataclass
class SourceConfig:
    """One data source; a source's name defaults to its path."""

    name: str = _f("", help="name in metrics (source_counts) and errors; empty: from the path")
    path: str = _f("", nonempty=True, help="shards (dir / glob / brace pattern), a .bin/.idx prefix, a file or folder, "
                                           "relative to data.root")
    # webdataset / llava / parquet are read as users have them (docs/data.md)
    type: Literal["auto", "shards", "indexed", "jsonl", "webdataset", "llava", "parquet"] = _f(
        "auto", help="format; auto: told from the files (data/manifest.py)")
    modality: Literal["text", "multimodal"] = _f("multimodal", help="which steps draw from it (language-only or "
                                                                    "multimodal)")
    category: str = _f("", help="a label (the paper's data categories in configs/data/); training does not read it")
    weight: float = _f(1.0, gt=0, help="share within its modality, relative to the other sources' weights")
    image_root: str = _f("", help="llava / parquet: folder image paths are relative to (default: the data file's "
                                  "folder)")
    image_column: str = _f("", help="parquet: image column (default: the first of image, images, jpg, png, img)")
    text_column: str = _f("", help="parquet: text column (default: the first of conversations, conversation, text, "
                                   "caption, txt)")


@dataclass
class DataConfig:
    """Where the samples come from and how global steps are made of them."""

    root: str = _f("demo_data", help="data folder; source paths, the tokenizer and eval files are relative to it")
    tokenizer: str = _f("tokenizer.json", nonempty=True, help="HF tokenizers file, relative to root unless absolute")
    manifest: str = _f("", help="a YAML file listing the sources (relative to root); else data.sources")
    sources: list[SourceConfig] = _f(factory=list, help="the sources, inline (when no manifest)")
    group_by_modality: bool = _f(True, help="every global step all-language or all-multimodal (the paper); false: "
                                            "mixed steps")
    packing: bool = _f(False, help="pack several samples per sequence, first fit (stage 2); positions restart per "
                                   "document")
    document_causal: bool = _f(True, help="with packing: no attention across packed documents")
    trim_padding: bool = _f(True, help="without a pipeline: a microbatch is only as wide as its longest row, rounded "
                                       "up to a multiple of 8 x tp (SFT rows are mostly shorter than seq_len); "
                                       "pipelines keep seq_len (fixed shapes)")
    language_ratio: LanguageRatioConfig = _f(factory=LanguageRatioConfig, help="the language share of the steps "
                                                                                "and its warm-down")
    balance: Literal["none", "rows"] = _f("rows", help="which dp rank and microbatch trains each row of a step: "
                                                      "rows: balanced by predicted cost (images, attention), "
                                                      "none: contiguous shares in plan order (data/placement.py)")
    system_prompt: str = _f("", help="text put before every SFT conversation")
    skip_samples: list[str] = _f(factory=list, help="samples never drawn, as '<source name>:<sample index>' (e.g. from "
                                                    "<run_dir>/bad_steps.jsonl); a draw of one takes the source's next "
                                                    "sample")
    num_workers: int = _f(0, ge=0, help="DataLoader worker processes (each prepares whole steps); 0: the main "
                                        "process")
    prefetch_steps: int = _f(2, ge=1, help="steps each worker prepares ahead")
    max_image_pixels: int = _f(8192 * 8192, ge=0, help="pixel budget per image, read from its header before "
                               "decoding: a larger JPEG is decoded at 1/2, 1/4 or 1/8 size, other formats are skipped "
                               "and counted in bad_images (never a decompression bomb decoded in full: ~10 bytes a "
                               "pixel); 8192^2 keeps Pillow's warning limit (89.5M) out of reach; 0: no budget")


@dataclass
class PretrainedConfig:
    """Local pretrained weights for stage 1 (later stages use ``train.init_from``)."""

    llm: str = _f("", help="HF LLaMA / DeepSeek-LLM directory (config.json + safetensors)")
    siglip: str = _f("", help="timm ViT state dict (safetensors or torch file)")
    sam: str = _f("", help="segment-anything / timm samvit / DeepSeek-VL state dict")


@dataclass
class ProfileConfig:
    """torch.profiler over a window of steps: a Chrome trace per rank and a pipeline timeline in
    ``<run_dir>/profile`` (train/profiling.py)."""

    steps: list[int] = _f(factory=list, ge=1, help="[first, last] steps profiled, inclusive; empty: off")


@dataclass
class TrainConfig:
    """One training stage: trainable parts, batch, optimizer and schedule, run dir, evaluation, preemption."""

    stage: Literal[1, 2, 3] = _f(1, help="paper stage: 1 adaptor warm-up, 2 joint VL pretraining, 3 SFT")
    trainable: list[Literal["siglip", "sam", "adaptor", "llm"]] = _f(
        factory=list, help="parts that learn; empty: the paper's for the stage (1: adaptor; 2: + llm; 3: + siglip)")
    steps: int = _f(100, ge=1, help="optimizer steps of the run")
    global_batch_size: int = _f(8, ge=1, help="sequences per optimizer step, over all dp ranks and microbatches")
    micro_batch_size: int = _f(8, ge=1, help="sequences per microbatch per dp rank; global = micro x "
                                             "accumulation x dp")
    seq_len: int = _f(4096, ge=1, help="tokens per sequence (every row padded or packed to it)")
    seed: int = _f(0, ge=0, help="seed of the initial weights (per parameter name) and the data order")
    lr: float = _f(1e-3, gt=0, help="peak learning rate")
    min_lr_ratio: float = _f(0.1, ge=0, le=1, help="cosine floor, as a fraction of lr")
    lr_schedule: Literal["cosine", "step", "constant"] = _f("cosine", help="LR after the warm-up: cosine to "
                                                                          "min_lr_ratio, step, or constant")
    warmup_steps: int = _f(0, ge=0, help="linear LR warm-up steps")
    step_milestones: list[float] = _f(factory=lambda: [0.8, 0.9], gt=0, lt=1,
                                      help="step schedule: where the LR drops, as fractions of steps")
    step_gamma: float = _f(0.316, gt=0, le=1, help="step schedule: LR multiplier at each milestone (DeepSeek-LLM: "
                                                   "31.6%, then 10%)")
    weight_decay: float = _f(0.0, ge=0, help="AdamW weight decay (the paper: 0)")
    beta1: float = _f(0.9, ge=0, lt=1, help="AdamW beta1")
    beta2: float = _f(0.95, ge=0, lt=1, help="AdamW beta2")
    eps: float = _f(1e-8, gt=0, help="AdamW epsilon")
    grad_clip: float = _f(1.0, ge=0, help="clip the global gradient norm (over dp, tp and pp) to this; 0: off")
    check_finite: bool = _f(True, help="skip the update of a step whose loss or gradient norm is not finite (counted "
                                       "as a bad step) and refuse to save non-finite weights; false: no checks")
    max_bad_steps: int = _f(5, ge=1, help="stop (exit 43, saving nothing) after this many bad steps in a row (a "
                                          "rolled-back step counts until a step after it succeeds)")
    on_bad_step: Literal["skip", "rollback", "stop"] = _f(
        "skip", help="a bad step (non-finite, or a loss spike): skip its update; rollback: reload the newest good "
                     "checkpoint, never draw the step's offending samples again and replay (exact); stop: exit 43")
    spike_factor: float = _f(3.0, ge=0, help="a step whose loss exceeds this times the median of its modality's last "
                                             "train.spike_window good losses is a bad step (loss spike); 0: off")
    spike_window: int = _f(50, ge=2, help="good steps per modality (text, multimodal, mixed) the spike median is "
                                          "taken over; detection starts once half of them are seen")
    dtype: Literal["auto", "bf16", "fp32"] = _f(
        "auto", help="auto: bf16 on GPU, fp32 on CPU; bf16: one policy in every layout (bf16 compute; fp32 master "
                     "weights, optimizer state and gradient reduction, FSDP2's MixedPrecisionPolicy)")
    frozen_tower_cache_mb: float = _f(0.0, ge=0, help="keep a frozen vision tower's output per image (keyed by its "
                                                     "pixels) up to this many MB per rank and reuse it when the image "
                                                     "comes again (multi-epoch SFT, the demo); 0: off")
    logits_at_labels: bool = _f(True, help="without tp and pp: project to the vocabulary and score only the "
                                           "supervised positions (SFT supervises a few percent); false: all")
    compile: bool | Literal["auto"] = _f("auto", help="torch.compile each decoder block; auto: on GPU only "
                                                            "(not TE blocks)")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", help="auto: cuda when a GPU is visible (cuda:LOCAL_RANK), "
                                                             "else cpu")
    init_from: str = _f("", help="weights of a previous stage (run dir, checkpoint or .safetensors), with a fresh "
                                 "optimizer and schedule")
    pretrained: PretrainedConfig = _f(factory=PretrainedConfig, help="pretrained parts from local files")
    run_dir: str = _f("runs/default", nonempty=True, help="metrics, evaluations, logs, checkpoints and the lock")
    eval_interval: int = _f(0, ge=0, help="evaluate every this many steps (0: only at the end)")
    eval_at_start: bool = _f(False, help="a fresh start evaluates its starting weights first (step 0 in eval.jsonl)")
    eval_at_end: bool = _f(True, help="evaluate the final weights (summary.json's eval); false: not at the end")
    eval_file: str = _f("", help="multi-choice eval set (JSONL) for MCPPL, relative to data.root")
    eval_text: str = _f("", help="held-out text (JSONL with \"text\", or a .bin/.idx prefix) for bits per byte and "
                                 "perplexity, relative to data.root")
    preempt_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP"]] = _f(
        factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"],
        help="signals (and a first Ctrl-C) that make every rank save at the end of the step and exit 42")
    max_wall_time: float = _f(0.0, ge=0, help="seconds; > 0: save and exit 42 before it runs out (a Slurm job's "
                                              "end counts too)")
    exit_margin_s: float = _f(0.0, ge=0, help="seconds kept for the last save before a deadline; 0: 2 x slowest "
                                              "step + 2 x slowest save")
    profile: ProfileConfig = _f(factory=ProfileConfig, help="torch.profiler window")


@dataclass
class CheckpointConfig:
    """Resumable DCP checkpoints (any layout) and the final weights."""

    interval: int = _f(0, ge=0, help="checkpoint every this many steps (0: only at the end)")
    dir: str = _f("", help="checkpoint folder; empty: <run_dir>/checkpoints")
    keep_last: int = _f(2, ge=1, help="verified checkpoints kept (the newest good one is never pruned)")
    resume: str = _f("", help="auto: the newest good checkpoint in dir (none: start fresh); or a checkpoint path")
    overwrite: bool = _f(False, help="start over in a run dir that holds a run (checkpoints or metrics): the old "
                                     "run is moved aside to <run_dir>.old-<time>; without it (and without resume) "
                                     "such a start is refused")
    async_save: bool = _f(False, help="write interval checkpoints in the background while training continues")


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl and optional loggers."""

    log_interval: int = _f(1, ge=1, help="console line every this many steps (metrics.jsonl gets every step)")
    peak_tflops: float = _f(0.0, ge=0, help="per-device peak TFLOP/s for MFU and the pipeline cost model; 0: "
                                            "the GPU's datasheet bf16 peak (hardware.py), 1.0 on CPU")
    wandb: bool = _f(False, help="log to Weights & Biases when installed (.[logging])")
    wandb_project: str = _f("vlpretrain", help="the wandb project")
    tensorboard: bool = _f(False, help="log to TensorBoard when installed (.[logging])")


@dataclass
class Config:
    """The whole configuration: one section per concern."""

    model: ModelConfig = _f(factory=ModelConfig, help="the model")
    parallel: ParallelConfig = _f(factory=ParallelConfig, help="the parallel layout")
    train: TrainConfig = _f(factory=TrainConfig, help="the training stage")
    data: DataConfig = _f(factory=DataConfig, help="the data")
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig, help="checkpoints")
    logging: LoggingConfig = _f(factory=LoggingConfig, help="logging")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


STAGE_TRAINABLE = {1: ["adaptor"], 2: ["adaptor", "llm"], 3: ["adaptor", "llm", "siglip"]}


def trainable_parts(cfg: Config) -> list[str]:
    return list(cfg.train.trainable) or STAGE_TRAINABLE[cfg.train.stage]
