"""GPU settings chosen on a CPU-only machine: AdamW's kernel from the parameters' device (fused on GPU, foreach
on CPU, one param group per tensor kind so plain tensors and DTensors both keep a multi-tensor kernel),
``train.compile: auto`` on GPU only, the peak-memory keys of a metrics record, and the NCCL environment."""
from __future__ import annotations

import os
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import run_script_ok

from vlpretrain.config import load_config
from vlpretrain.parallel.engine import use_compile
from vlpretrain.parallel.launch_env import gpu_env_defaults
from vlpretrain.train.metrics import GIB, PeakMemory
from vlpretrain.train.optim import build_optimizer, kernel_options

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# ------------------------------------------------------------------------------------------------- AdamW
def test_kernel_follows_the_parameters_device():
    on = lambda kind: SimpleNamespace(device=torch.device(kind))  # noqa: E731 - only .device is read
    assert kernel_options([on("cuda"), on("cuda")]) == {"fused": True}
    assert kernel_options([on("cpu")]) == {"foreach": True}
    assert kernel_options([on("cuda"), on("cpu")]) == {"foreach": True}  # fused needs one device kind


def test_cpu_optimizer_uses_foreach_and_matches_the_reference():
    torch.manual_seed(0)
    cfg = load_config(None, ["train.weight_decay=0.1"]).train
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, _ = build_optimizer(params, cfg)
    ref_opt = torch.optim.AdamW(ref, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay, foreach=False)
    assert len(opt.param_groups) == 1 and opt.defaults["foreach"] is True and not opt.defaults["fused"]
    for _ in range(3):
        for p, q in zip(params, ref):
            p.grad = torch.full_like(p, 0.5)
            q.grad = torch.full_like(q, 0.5)
        opt.step()
        ref_opt.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q)


# plain tensors and DTensors in one optimizer (TP without FSDP): one group per kind, foreach in each, a step
# equal to the per-tensor loop, and the flat optimizer state (by parameter name) loads into a one-group optimizer
_MIXED = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard, DTensor
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from vlpretrain.config import load_config
    from vlpretrain.train.optim import build_optimizer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].weight = torch.nn.Parameter(distribute_tensor(model[1].weight.detach(), mesh, [Shard(0)]))
    cfg = load_config(None, []).train
    params = list(model.parameters())
    opt, _ = build_optimizer(params, cfg)
    kinds = [{type(p.data) for p in g["params"]} for g in opt.param_groups]
    assert len(kinds) == 2 and all(len(k) == 1 for k in kinds), kinds
    assert all(g["foreach"] is True and not g["fused"] for g in opt.param_groups)
    ref = [p.detach().clone() for p in params]
    ref = [torch.nn.Parameter(r.full_tensor() if isinstance(r, DTensor) else r) for r in ref]
    ref_opt = torch.optim.AdamW(ref, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay, foreach=False)
    for i in range(2):
        for p, q in zip(params, ref):
            g = torch.full(tuple(q.shape), 0.25 * (i + 1))
            q.grad = g.clone()
            p.grad = distribute_tensor(g, mesh, [Shard(0)]) if isinstance(p.data, DTensor) else g
        opt.step()
        ref_opt.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.full_tensor() if isinstance(p.data, DTensor) else p.detach(), q.detach())
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    saved = get_optimizer_state_dict(model, opt, options=flat)
    other = torch.optim.AdamW(params, lr=cfg.lr, foreach=False)  # another grouping, as after a layout change
    for p in params:
        p.grad = torch.zeros_like(p)
    other.step()
    set_optimizer_state_dict(model, other, saved, options=flat)
    for p in params:
        a, b = opt.state[p]["exp_avg"], other.state[p]["exp_avg"]
        torch.testing.assert_close(a.full_tensor() if isinstance(a, DTensor) else a,
                                   b.full_tensor() if isinstance(b, DTensor) else b)
    dist.destroy_process_group()
    print("ok")
""")


def test_mixed_plain_and_dtensor_parameters_get_a_group_each():
    run_script_ok(_MIXED)


# ----------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("value, cpu, cuda", [("auto", False, True), ("true", True, True), ("false", False, False)])
def test_compile_auto_is_on_for_gpu_only(value, cpu, cuda):
    cfg = load_config(None, [f"train.compile={value}"])
    assert use_compile(cfg, CPU) is cpu and use_compile(cfg, CUDA) is cuda


# ------------------------------------------------------------------------------------------ peak memory
class _FakeGpu:
    """Peaks that grow until reset (bytes), standing in for torch.cuda's counters."""

    def __init__(self):
        self.alloc, self.reserved, self.resets = 0.0, 0.0, 0

    def read(self, device):
        return self.alloc, self.reserved

    def reset(self, device):
        self.alloc, self.reserved, self.resets = 0.0, 0.0, self.resets + 1


def test_peak_memory_keys_on_gpu_reset_per_log_interval():
    gpu = _FakeGpu()
    mem = PeakMemory(CUDA, log_interval=2, read=gpu.read, reset=gpu.reset, gather=lambda v, d: [v])
    assert gpu.resets == 1  # start-up (weights, checkpoint) is not a step's peak
    gpu.alloc, gpu.reserved = 3 * GIB, 4 * GIB
    assert mem.record(1) == {"gpu_mem_allocated_gib": 3.0, "gpu_mem_reserved_gib": 4.0, "gpu_mem_rank": 0}
    assert gpu.resets == 1  # step 1 is inside the first interval: the peak keeps growing
    gpu.alloc = 5 * GIB
    assert mem.record(2)["gpu_mem_allocated_gib"] == 5.0 and gpu.resets == 2  # end of the interval: reset
    gpu.alloc, gpu.reserved = 1 * GIB, 1.5 * GIB
    assert mem.record(3) == {"gpu_mem_allocated_gib": 1.0, "gpu_mem_reserved_gib": 1.5, "gpu_mem_rank": 0}


def test_peak_memory_reports_the_fullest_rank():
    gathered = [[2 * GIB, 3 * GIB], [6 * GIB, 7 * GIB], [6.5 * GIB, 6.75 * GIB]]  # e.g. pipeline stages differ
    mem = PeakMemory(CUDA, 1, read=lambda d: (0.0, 0.0), reset=lambda d: None, gather=lambda v, d: gathered)
    assert mem.record(1) == {"gpu_mem_allocated_gib": 6.5, "gpu_mem_reserved_gib": 7.0, "gpu_mem_rank": 1}


def test_no_memory_keys_on_cpu():
    calls = []
    mem = PeakMemory(CPU, 1, read=lambda d: calls.append("read"), reset=lambda d: calls.append("reset"),
                     gather=lambda v, d: calls.append("gather"))
    assert mem.record(1) == {} and calls == []  # and no collective


# -------------------------------------------------------------------------------------------------- NCCL
_NCCL = ("TORCH_NCCL_AVOID_RECORD_STREAMS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")


@pytest.fixture
def clean_env(monkeypatch):
    for k in _NCCL:  # set, then delete: monkeypatch restores the variable (set or not) after the test, so
        monkeypatch.setenv(k, "")  # what gpu_env_defaults writes into os.environ does not leak
        monkeypatch.delenv(k)
    return monkeypatch


def test_nccl_env_with_tp(clean_env):
    cfg = load_config(None, ["parallel.tp=2"])
    assert gpu_env_defaults(cfg, CUDA) == {"TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
                                           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert os.environ["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_nccl_env_without_tp(clean_env):
    assert gpu_env_defaults(load_config(None, []), CUDA) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert "TORCH_NCCL_AVOID_RECORD_STREAMS" not in os.environ


def test_nccl_env_users_values_win(clean_env):
    clean_env.setenv("TORCH_NCCL_AVOID_RECORD_STREAMS", "0")
    clean_env.setenv("NCCL_ASYNC_ERROR_HANDLING", "1")  # the old name counts as the user's choice too
    assert gpu_env_defaults(load_config(None, ["parallel.tp=4"]), CUDA) == {}
    assert os.environ["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "0"
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ


def test_nccl_env_untouched_on_cpu(clean_env):
    assert gpu_env_defaults(load_config(None, ["parallel.tp=2"]), CPU) == {}
    assert not any(k in os.environ for k in _NCCL)

