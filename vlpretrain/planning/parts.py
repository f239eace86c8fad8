"""A config's pipeline parts for the cost model (``cost.Part``), per step type of the run's step mix.

FLOPs, parameters and activations come from ``pipeline_cost.part_costs`` (the splitter's own accounting:
backward rules per stage, tp and the image split applied, the recompute mode's activations); this module adds
what the planner needs on top: the attention share (causal: half the S x S scores), the matmul width that picks
the efficiency (decoder and head: dim / tp; the first stage: the SigLIP tower's width), parameters per TP rank,
the TP collectives (the decoder's activations; the image split's all-gather of adaptor outputs) and the FSDP
keep-gathered rule (``parallel.fsdp_reshard_after_forward`` / ``fsdp_keep_gathered_below_mb``).
"""
from __future__ import annotations

from vlpretrain.config import Config, trainable_parts
from vlpretrain.data.step_mix import StepType
from vlpretrain.models.flops import step_flops
from vlpretrain.parallel.pipeline_cost import part_costs
from vlpretrain.planning.cost import Part


def _kept(cfg: Config, params: float, name: str) -> bool:
    """Whether FSDP keeps this unit gathered between forward and backward (``fsdp.apply_fsdp``'s rule)."""
    if name == "head":
        return True
    mode = cfg.parallel.fsdp_reshard_after_forward
    if mode == "auto":
        return 2 * params < cfg.parallel.fsdp_keep_gathered_below_mb * 2 ** 20
    return not mode


def config_parts(cfg: Config, st: StepType) -> list[Part]:
    """The parts [embed, layers..., head] of one microbatch of step type ``st`` on one device."""
    m, par, t = cfg.model, cfg.parallel, cfg.train
    tp, b, s = par.tp, t.micro_batch_size, t.seq_len
    costs = part_costs(cfg, device_tflops=1.0, efficiency=1.0, image_counts=st.images or (0,))
    attn_fwd = b * 4 * s * s * m.n_heads * m.head_dim / tp  # per decoder layer, full S x S
    out = []
    for c in costs:
        if c.name == "embed":
            gathered = sum(st.images) / max(len(st.images), 1) if st.images else 0.0
            split = tp > 1 and par.vision_split == "images" and gathered > 0
            out.append(Part("embed", c.flops, c.forward_flops, 0.0, m.siglip.width, c.params, c.trainable_params,
                            c.activation_bytes, tp_bytes=2 * gathered * m.image_tokens * m.dim if split else 0.0,
                            tp_colls=2 if split else 0, keep_gathered=_kept(cfg, c.params, "embed")))
            continue
        runs_bwd = c.flops > c.forward_flops
        if c.name == "head":
            out.append(Part("head", c.flops, c.forward_flops, 0.0, m.dim // tp, c.params / tp,
                            c.trainable_params / tp, c.activation_bytes, keep_gathered=True))
            continue
        mult = c.flops / c.forward_flops if c.forward_flops else 0.0
        causal = 0.5 * attn_fwd * mult  # half of the scores: what flash attention computes under a causal mask
        colls = (12 if par.activation_checkpointing == "full" and runs_bwd else 8 if runs_bwd else 4) if tp > 1 else 0
        out.append(Part(c.name, c.flops - causal, c.forward_flops - 0.5 * attn_fwd, causal, m.dim // tp,
                        c.params / tp, c.trainable_params / tp, c.activation_bytes, tp_bytes=2 * b * s * m.dim,
                        tp_colls=colls, keep_gathered=_kept(cfg, c.params / tp, c.name)))
    return out


def model_flops_per_step(cfg: Config, st: StepType) -> float:
    """Model FLOPs of one optimizer step of type ``st`` (the MFU counter's convention: ``step_flops``)."""
    t = cfg.train
    per_mb = sum(st.images) / max(len(st.images), 1) if st.images else 0.0
    n_mb = t.global_batch_size / t.micro_batch_size
    return step_flops(cfg.model, t.global_batch_size, t.seq_len, round(per_mb * n_mb), trainable_parts(cfg)).total
