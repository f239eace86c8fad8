"""What ``vlpretrain plan --search`` prints and writes: the ranked table, why the runners-up lost, the chosen
layout as a config ``vlpretrain train`` accepts and as a Slurm job for ``launch/slurm/train.sbatch``."""
from __future__ import annotations

import json
from pathlib import Path

from vlpretrain.config import Config
from vlpretrain.files import write_text_atomic
from vlpretrain.planning.search import describe


def format_search(cfg: Config, res: dict) -> str:
    cl = res["cluster"]
    nodes = -(-res["world_size"] // cl["gpus_per_node"])
    lines = [f"{cfg.model.name} stage {cfg.train.stage} on {res['world_size']} x {cl['gpu']} ({nodes} nodes of "
             f"{cl['gpus_per_node']}; {cl['peak_tflops']:g} TFLOP/s, {cl['mem_gib']:g} GiB, NVLink "
             f"{cl['intra_gbps']:g} GB/s, network {cl['inter_gbps']:g} GB/s per GPU): global batch "
             f"{cfg.train.global_batch_size} x {cfg.train.seq_len} tokens",
             f"searched {res['candidates']} valid layouts in {res['search_seconds']:.1f} s "
             f"({res['fit_memory']} fit in memory, {res['out_of_memory']} do not; "
             f"{sum(res['invalid'].values())} combinations invalid)", ""]
    head = (f"{'#':>2}  {'layout':<78}{'step s':>8}{'tok/s/GPU':>10}{'MFU':>6}{'GiB':>6}"
            f"{'bubble':>8}{'comm':>7}")
    lines.append(head)
    for i, row in enumerate(res["top"], 1):
        lines.append(f"{i:>2}  {describe(row):<78}{row['step_time_s']:>8.3f}{row['tokens_per_s_per_gpu']:>10.0f}"
                     f"{row['mfu']:>6.2f}{row['memory_gib']:>6.1f}{row['bubble_s']:>8.3f}{row['exposed_comm_s']:>7.3f}")
    lines.append("    (comm: exposed TP + pipeline-send + FSDP seconds per step; the step is the expected one over "
                 "the step mix)")
    best = res["best"]
    lines.append("")
    lines.append(f"best: {describe(best)}, layer_split {best['layer_split']}, {best['n_microbatches']} "
                 f"microbatches per step")
    parts = ", ".join(f"{k[:-2].replace('_', ' ')} {best[k]:.3f}" for k in
                      ("compute_s", "tp_comm_s", "pp_send_s", "bubble_s", "fsdp_exposed_s", "optimizer_s"))
    lines.append(f"  step {best['step_time_s']:.3f} s = {parts} s")
    lines.append("  memory per GPU " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in
                                                 best["memory_parts_gib"].items()) + f" = {best['memory_gib']:.1f} GiB")
    for i, row in enumerate(res["top"][1:], 2):
        lines.append(f"  #{i} lost: {row['why_not_best']}")
    for row in res["faster_but_out_of_memory"]:
        lines.append(f"  faster but {row['why_not_best']}: {describe(row)}")
    return "\n".join(lines)


def json_line(res: dict) -> str:
    keep = {k: v for k, v in res.items() if k != "best_config"}
    return json.dumps(keep, default=str)


def write_config(res: dict, path: str | Path) -> None:
    """The config with the best layout (every key explicit, ``dp`` and ``layer_split`` included)."""
    cfg: Config = res["best_config"]
    from vlpretrain.planning.search import with_layout

    cfg = with_layout(cfg, dp=res["best"]["dp"])
    note = f"# written by `vlpretrain plan --search` for {res['world_size']} GPUs: {describe(res['best'])}\n"
    write_text_atomic(Path(path), note + cfg.to_yaml())


def write_sbatch(res: dict, path: str | Path, config_path: str) -> None:
    """A job for ``launch/slurm/train.sbatch`` running ``config_path`` on the searched world size."""
    cl, best = res["cluster"], res["best"]
    gpn = cl["gpus_per_node"]
    nodes = -(-res["world_size"] // gpn)
    text = f"""#!/bin/bash
# Written by `vlpretrain plan --search`: {res['world_size']} GPUs ({nodes} nodes x {gpn} {cl['gpu']}),
#   {describe(best)}, layer_split {best['layer_split']};
#   predicted {best['step_time_s']:.3f} s/step, {best['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, MFU \
{best['mfu']:.2f}, {best['memory_gib']:.1f} GiB per GPU.
# Submit from the repository root: mkdir -p logs && sbatch {path}
#SBATCH --job-name=vlpretrain-planned
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={gpn}
#SBATCH --gpus-per-node={gpn}
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

CONFIG=${{CONFIG:-{config_path}}}
GPUS_PER_NODE=${{GPUS_PER_NODE:-{gpn}}}
source "${{VLP_HOME:-${{SLURM_SUBMIT_DIR:-.}}}}/launch/slurm/train.sbatch"
"""
    write_text_atomic(Path(path), text)
