"""Per-step metrics: one JSON line per optimizer step, a console progress line, optional wandb / tensorboard."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vlpretrain.config import Config
from vlpretrain.files import write_text_atomic
from vlpretrain.hardware import CPU_DEFAULT_PEAK, device_peak_tflops  # noqa: F401 - re-exported


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of steps after ``step`` (a resumed run logs them again), atomically; keep the rest."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):  # a line cut by a crash: drop it too
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) == len(lines) and all(a == b for a, b in zip(keep, lines)):
        return
    write_text_atomic(path, "".join(keep))


def json_safe(v):
    """``v`` with every non-finite float (NaN, +-inf) as None: ``json.dumps`` would write ``NaN``, not JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def json_line(record: dict) -> str:
    """One strict-JSON line (non-finite numbers as null; the step's ``bad_step_reason`` says why)."""
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def eval_record(step: int, results: dict) -> dict:
    """Flat eval.jsonl line: step, mcppl_accuracy, mcppl_by_type, text_bpb, text_ppl, eval_time_s."""
    record = {"step": step}
    if "mcppl" in results:
        r = results["mcppl"]
        record.update(mcppl_accuracy=r["accuracy"], mcppl_by_type=r["by_type"], mcppl_n=r["n"])
    if "text" in results:
        r = results["text"]
        record.update(text_bpb=r["bits_per_byte"], text_ppl=r["perplexity"], text_tokens=r["tokens"])
    if "eval_time_s" in results:
        record["eval_time_s"] = results["eval_time_s"]
    return record


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics / eval record for wandb and tensorboard: dicts flattened into ``key/name``
    (``source_counts/captions``, ``eval/mcppl_by_type/colour``), strings and ``step`` left out; a training
    record also gives ``loss/<modality>`` so dashboards can split the loss as the report does."""
    out: dict[str, float] = {}

    def walk(key: str, v) -> None:
        if isinstance(v, bool):
            out[key] = int(v)
        elif isinstance(v, (int, float)):
            out[key] = v
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{key}/{k}", x)

    for k, v in record.items():
        if k != "step":
            walk(prefix + k, v)
    if isinstance(record.get("modality"), str) and isinstance(record.get("loss"), (int, float)):
        out[f"{prefix}loss/{record['modality']}"] = record["loss"]
    return out


GIB = float(1 << 30)


def _cuda_peaks(device) -> tuple[float, float]:
    return float(torch.cuda.max_memory_allocated(device)), float(torch.cuda.max_memory_reserved(device))


def _cuda_reset(device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


def _gather_ranks(values: list[float], device) -> list[list[float]]:
    """Every rank's ``values`` (one small all-gather; just ours without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = torch.empty(dist.get_world_size() * len(values), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(out, t)
    return out.view(dist.get_world_size(), len(values)).tolist()


class PeakMemory:
    """Peak GPU memory of every rank since the start of the current log interval, for each metrics record:
    ``gpu_mem_allocated_gib`` / ``gpu_mem_reserved_gib`` (the largest over ranks: the one that runs out of
    memory first; pipeline stages differ) and ``gpu_mem_rank`` (the rank with the most reserved). The peaks are
    reset after the record of every ``log_interval``-th step. Off GPU the record gets no keys.
    ``read`` / ``reset`` / ``gather`` replace the CUDA and collective calls (tests)."""

    def __init__(self, device, log_interval: int, read=None, reset=None, gather=None):
        self.device, self.interval = device, log_interval
        self.on = device.type == "cuda"
        self._read, self._reset = read or _cuda_peaks, reset or _cuda_reset
        self._gather = gather or _gather_ranks
        if self.on:
            self._reset(device)  # loading weights and checkpoints is not a training step's peak

    def record(self, step: int) -> dict:
        """The keys for step ``step``'s record (called on every rank: the gather is a collective)."""
        if not self.on:
            return {}
        per_rank = self._gather(list(self._read(self.device)), self.device)
        if step % self.interval == 0:
            self._reset(self.device)
        worst = max(range(len(per_rank)), key=lambda r: (per_rank[r][1], per_rank[r][0]))
        return {"gpu_mem_allocated_gib": round(max(a for a, _ in per_rank) / GIB, 3),
                "gpu_mem_reserved_gib": round(max(r for _, r in per_rank) / GIB, 3), "gpu_mem_rank": worst}


class MetricsLogger:
    """Writes ``<run_dir>/metrics.jsonl`` (appending, flushed per line) and prints progress on rank 0."""

    def __init__(self, cfg: Config, run_dir: Path, total_steps: int, is_main: bool = True, resume_step: int = 0):
        self.cfg = cfg
        self.total = total_steps
        self.is_main = is_main
        self.start = time.perf_counter()
        self.steps_timed = 0
        self.time_sum = 0.0
        self._file = None
        self._wandb = None
        self._tb = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_after(run_dir / "metrics.jsonl", resume_step)
        truncate_after(run_dir / "eval.jsonl", resume_step)
        self._eval_path = run_dir / "eval.jsonl"
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.logging.wandb:
            try:
                import wandb  # optional

                # WANDB_MODE=offline keeps everything under <run_dir>/wandb (``wandb sync`` uploads it later)
                self._wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir), name=run_dir.name,
                                         config=cfg.to_dict())
            except ImportError:
                print("warning: logging.wandb is on but wandb is not installed; skipping it", file=sys.stderr)
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("warning: logging.tensorboard is on but tensorboard is not installed", file=sys.stderr)

    def log(self, record: dict) -> None:
        step = record["step"]
        if step > 1:  # the first step pays for warm-up / compilation: keep it out of the ETA
            self.steps_timed += 1
            self.time_sum += record["step_time_s"]
        if not self.is_main:
            return
        self._file.write(json_line(record))
        self._file.flush()
        self._forward(scalars(record), step)
        if step % self.cfg.logging.log_interval == 0 or step == self.total:
            avg = self.time_sum / self.steps_timed if self.steps_timed else record["step_time_s"]
            eta = avg * (self.total - step)
            print(f"step {step}/{self.total} | {record['modality']:>10} | loss {record['loss']:.4f} | "
                  f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
                  f"{record['tokens_per_s']:,.0f} tok/s | mfu {100 * record['mfu']:.2f}% | "
                  + (f"mem {record['gpu_mem_reserved_gib']:.1f} GiB | " if "gpu_mem_reserved_gib" in record else "")
                  + f"ETA {format_duration(eta)}", flush=True)

    def rewind(self, step: int) -> None:
        """A rollback to ``step``: drop the lines after it (the replay logs those steps again)."""
        if not self.is_main:
            return
        self._file.close()
        truncate_after(self._eval_path.with_name("metrics.jsonl"), step)
        truncate_after(self._eval_path, step)
        self._file = open(self._eval_path.with_name("metrics.jsonl"), "a", encoding="utf-8")

    def log_eval(self, step: int, results: dict) -> dict:
        """One line of ``<run_dir>/eval.jsonl`` (and the loggers, the console) from ``Evaluator.run``."""
        record = eval_record(step, results)
        if not self.is_main:
            return record
        with open(self._eval_path, "a", encoding="utf-8") as f:
            f.write(json_line(record))
        self._forward(scalars(record, "eval/"), step)
        parts = []
        if "mcppl_accuracy" in record:
            types = " ".join(f"{t} {a:.2f}" for t, a in record["mcppl_by_type"].items())
            parts.append(f"mcppl accuracy {record['mcppl_accuracy']:.3f} ({types})")
        if "text_bpb" in record:
            parts.append(f"text bits/byte {record['text_bpb']:.3f} ppl {record['text_ppl']:.2f}")
        print(f"eval step {step}: " + " | ".join(parts), flush=True)
        return record

    def _forward(self, values: dict[str, float], step: int) -> None:
        """The same scalars to wandb and tensorboard (whichever are on)."""
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
