"""Per-step metrics: one JSON line per optimizer step, a console progress line, optional wandb / tensorboard."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from vlpretrain.config import Config
from vlpretrain.models.peaks import CPU_DEFAULT_PEAK, device_peak_tflops  # noqa: F401 - re-exported


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


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
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.logging.wandb:
            try:
                import wandb  # optional

                self._wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir), config=cfg.to_dict())
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
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if step % self.cfg.logging.log_interval == 0 or step == self.total:
            avg = self.time_sum / self.steps_timed if self.steps_timed else record["step_time_s"]
            eta = avg * (self.total - step)
            print(f"step {step}/{self.total} | {record['modality']:>10} | loss {record['loss']:.4f} | "
                  f"lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
                  f"{record['tokens_per_s']:,.0f} tok/s | mfu {100 * record['mfu']:.2f}% | "
                  f"ETA {format_duration(eta)}", flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
