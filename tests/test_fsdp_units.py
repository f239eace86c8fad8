"""FSDP2 units with ``parallel.fsdp_reshard_after_forward: auto``: units below the size threshold keep their
parameters gathered from forward to backward and across a step's microbatches (one all-gather per step), larger
units are freed after forward; after the step's last microbatch every unit is back to its shards. The losses and
gradients of layouts with FSDP are compared with one process in test_parallel_equivalence.py."""
from __future__ import annotations

import textwrap

from conftest import run_script_ok

_UNITS = textwrap.dedent("""
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from vlpretrain.parallel.fsdp import apply_fsdp, keep_gathered_between_microbatches, reshard_all

    class Stage(nn.Module):  # a decoder stage's shape: layers by name, a head
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict({"0": nn.Linear(16, 16), "1": nn.Linear(16, 512)})
            self.head = nn.Linear(512, 4)
        def forward(self, x):
            return self.head(self.layers["1"](self.layers["0"](x)))

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    stage = Stage()
    # layer 0: 272 params, layer 1: 8704 params (bf16: 544 B / 17 KiB): threshold 4 KiB keeps layer 0 only
    apply_fsdp(stage, mesh, "auto", torch.bfloat16, keep_gathered_below_mb=4 / 1024)
    small, large = stage.layers["0"], stage.layers["1"]
    assert small._vlp_keep_gathered and not large._vlp_keep_gathered
    assert stage.head._vlp_keep_gathered  # the head's backward follows its forward at once

    sharded = lambda m: isinstance(m.weight, DTensor)
    x = torch.randn(3, 16)
    for i, last in enumerate((False, False, True)):
        stage.set_requires_gradient_sync(last)
        keep_gathered_between_microbatches(stage, last)
        out = stage(x)
        assert not sharded(small) and sharded(large), "after forward: small kept, large freed"
        out.float().sum().backward()
        assert sharded(large)
        assert sharded(small) is last, (i, "small stays gathered between microbatches, sharded after the last")
    assert isinstance(small.weight.grad, DTensor) and small.weight.grad.dtype == torch.float32

    # forward only (evaluation) leaves kept units gathered until reshard_all
    with torch.no_grad():
        stage(x)
    assert not sharded(small)
    reshard_all(stage)
    assert sharded(small) and sharded(large) and sharded(stage.head)

    # True / False keep their meaning: every unit freed after forward, or none
    for flag in (True, False):
        other = Stage()
        apply_fsdp(other, mesh, flag, torch.bfloat16, keep_gathered_below_mb=1e6)
        assert other.layers["0"]._vlp_keep_gathered is (not flag) and other.layers["1"]._vlp_keep_gathered is (not flag)
    dist.destroy_process_group()
    print("ok")
""")


def test_auto_keeps_small_units_gathered_across_microbatches():
    run_script_ok(_UNITS)
