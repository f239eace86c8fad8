"""``train.profile.steps: [a, b]``: torch.profiler over steps a..b, one Chrome trace per rank, and a pipeline
timeline drawn from the traces.

While profiling, every pipeline stage's ``forward_one_chunk`` / ``backward_one_chunk`` /
``backward_weight_one_chunk`` (and the last stage's loss) runs inside a ``record_function`` labelled
``vlp:F|B|I|W|L <stage> <microbatch>``: the pipelining schedules label only some schedules' actions, and
their labels include the waits for the neighbour's activations, which are exactly the idle time the timeline
must show. On GPU the device-side copies of these ranges (``gpu_user_annotation``) are used, since the CPU only
enqueues work. Each rank extracts its blocks from its own trace (``profile/blocks_rank<r>.json``); rank 0 then
draws ``profile/timeline.png`` and writes ``profile/bubble.json`` (measured vs theoretical bubble fraction).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

PREFIX = "vlp:"
_LABEL = re.compile(r"^vlp:([FBIWL]) (\d+) (\d+)$")
_STEP = re.compile(r"^vlp:step (\d+)$")




def pipeline_stages(schedule) -> list:
    """The PipelineStage objects a torch pipelining schedule runs on this rank."""
    if schedule is None:
        return []
    stages = getattr(schedule, "_stages", None)
    return list(stages) if stages else [schedule._stage]


def _wrap(fn, kind_of):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        kind, stage, mb = kind_of(args, kwargs)
        with record_function(f"{PREFIX}{kind} {stage} {mb}"):
            return fn(*args, **kwargs)
    return run


def instrument(schedule) -> list:
    """Label each stage computation of ``schedule``; returns an undo list for ``uninstrument``."""
    undo = []
    for st in pipeline_stages(schedule):
        sid = st.stage_index

        def fwd(a, k, sid=sid):
            return "F", sid, a[0] if a else k.get("fwd_chunk_id", 0)

        def bwd(a, k, sid=sid):
            full = k.get("full_backward", a[2] if len(a) > 2 else True)
            return ("B" if full else "I"), sid, a[0] if a else k.get("bwd_chunk_id", 0)

        def wgt(a, k, sid=sid):
            return "W", sid, a[0] if a else k.get("bwd_chunk_id", 0)

        for name, kind_of in (("forward_one_chunk", fwd), ("backward_one_chunk", bwd),
                              ("backward_weight_one_chunk", wgt)):
            if hasattr(st, name):
                undo.append((st, name, st.__dict__.get(name)))
                setattr(st, name, _wrap(getattr(st, name), kind_of))
    loss_fn = getattr(schedule, "_loss_fn", None)
    if loss_fn is not None:  # the last stage's loss runs between its forward and backward
        counter = iter(range(1 << 30))
        last = max(st.stage_index for st in pipeline_stages(schedule))
        undo.append((schedule, "_loss_fn", schedule.__dict__.get("_loss_fn")))
        schedule._loss_fn = _wrap(loss_fn, lambda a, k: ("L", last, next(counter)))
    return undo


def uninstrument(undo: list) -> None:
    for obj, name, before in reversed(undo):  # an instance attribute is put back, a class method uncovered
        if before is None:
            obj.__dict__.pop(name, None)
        else:
            setattr(obj, name, before)


def extract_blocks(trace: dict) -> dict:
    """From a Chrome trace: the labelled computations as [kind, stage, microbatch, start_us, end_us] and the
    step ranges as [step, start_us, end_us], in absolute microseconds (``baseTimeNanoseconds`` + ts), so the
    ranks' traces share one clock. Device-side ranges win where the trace has them."""
    base_us = trace.get("baseTimeNanoseconds", 0) / 1e3
    cpu, gpu, steps = [], [], []
    for e in trace.get("traceEvents", []):
        name = e.get("name")
        if e.get("ph") != "X" or not isinstance(name, str) or not name.startswith(PREFIX):
            continue
        t0 = base_us + float(e["ts"])
        t1 = t0 + float(e.get("dur", 0))
        m = _LABEL.match(name)
        if m:
            block = [m.group(1), int(m.group(2)), int(m.group(3)), t0, t1]
            (gpu if e.get("cat") == "gpu_user_annotation" else cpu).append(block)
        elif (s := _STEP.match(name)) and e.get("cat") != "gpu_user_annotation":
            steps.append([int(s.group(1)), t0, t1])
    blocks = gpu if gpu else cpu
    return {"blocks": sorted(blocks, key=lambda b: b[3]), "steps": sorted(steps), "device": bool(gpu)}


class StepProfiler:
    """The trainer's hook: ``before(step)`` / ``after(step)`` around each step; does nothing unless
    ``train.profile.steps`` is set. Every rank records; the last profiled step ends with a barrier, after
    which rank 0 draws the timeline."""

    def __init__(self, cfg, run_dir: Path, ctx, model):
        steps = list(cfg.train.profile.steps)
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.dir = Path(run_dir) / "profile"
        self.ctx, self.model = ctx, model
        lay = ctx.layout
        self.meta = {"schedule": cfg.parallel.schedule if lay.pp > 1 else "none", "pp": lay.pp, "vpp": lay.vpp,
                     "dp": lay.dp, "tp": lay.tp, "microbatches": lay.n_microbatches}
        self._prof = None
        self._undo: list = []
        self._step_range = None

    def before(self, step: int) -> None:
        if not self.first <= step <= self.last:
            return
        if self._prof is None:  # the window's first step (or the first after a resume inside it)
            self.dir.mkdir(parents=True, exist_ok=True)
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.ctx.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._undo = instrument(self.model.schedule)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
        self._step_range = record_function(f"{PREFIX}step {step}")
        self._step_range.__enter__()

    def after(self, step: int) -> None:
        if self._step_range is not None:
            self._step_range.__exit__(None, None, None)
            self._step_range = None
        if self._prof is None or step != self.last:
            return
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        self._prof.__exit__(None, None, None)
        uninstrument(self._undo)
        rank = self.ctx.rank
        trace_path = self.dir / f"trace_rank{rank}.json"
        self._prof.export_chrome_trace(str(trace_path))
        self._prof = None
        found = extract_blocks(json.loads(trace_path.read_text()))
        info = {"rank": rank, "pp_rank": self.ctx.pp_rank, "dp_rank": self.ctx.dp_rank,
                "tp_rank": self.ctx.tp_rank, **self.meta, **found}
        (self.dir / f"blocks_rank{rank}.json").write_text(json.dumps(info))
        if dist.is_initialized():
            dist.barrier()
        if self.ctx.is_main:
            from vlpretrain.report.timeline import draw_timeline

            r = draw_timeline(self.dir)
            meas = "-" if r["measured"] is None else f"{r['measured']:.3f}"
            print(f"profile: traces in {self.dir}; pipeline bubble measured {meas} vs {r['theoretical']:.3f} "
                  f"theoretical ({r['schedule']}, pp={r['pp']}, vpp={r['vpp']}, {r['microbatches']} microbatches);"
                  f" timeline {r['png']}", flush=True)
