"""Layout checks and the device mesh.

The layout is checked against the world size BEFORE any process group starts, so a bad layout costs one line
and no cluster time. The mesh is (pp, dp_replicate, dp_shard, tp) with tp innermost, so tensor-parallel peers
are neighbouring ranks (the same node on GPU clusters), and then the ranks of one FSDP shard group; "dp" is
the two dp dimensions flattened (dp rank = replica x dp_shard + shard index), which is what data placement,
loss and evaluation reductions read. FSDP2 shards over "dp", or under HSDP (``parallel.dp_shard`` < dp) over
the 2-D (dp_replicate, dp_shard) mesh: torchtitan's dims.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from vlpretrain.config import Config, ConfigError
from vlpretrain.layout_rules import dp_shard_problem, microbatch_problem, stages_of_rank
from vlpretrain.parallel.launch_env import apply_launch_env, gpu_env_defaults, pg_timeout_s, process_group_store
from vlpretrain.parallel.pipeline_split_mix import resolve_layer_split


@dataclass(frozen=True)
class Layout:
    """The whole parallel layout, derived once (``resolve_layout``) and read everywhere else: degrees, the
    schedule, microbatches per step per pipeline, and decoder layers per virtual stage."""

    dp: int
    tp: int
    pp: int
    vpp: int
    schedule: str = "1f1b"
    n_microbatches: int = 1
    split: tuple[int, ...] = ()
    dp_shard: int = 0  # FSDP2's shard group size (HSDP when < dp); 0 given: all of dp (stored as dp)

    def __post_init__(self) -> None:
        if not self.dp_shard:
            object.__setattr__(self, "dp_shard", self.dp)

    @property
    def dp_replicate(self) -> int:
        """Replicas of each parameter shard (1: plain FSDP over all of dp)."""
        return self.dp // self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def n_stages(self) -> int:
        return self.pp * self.vpp

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """Virtual stages pipeline rank ``pp_rank`` runs (the schedule table's placement)."""
        return stages_of_rank(pp_rank, self.pp, self.vpp, self.schedule)


def _fail(key: str, msg: str) -> None:
    """One line naming the key to change, like every config error (the world size comes from the launcher)."""
    raise ConfigError(f"config error: {key}: {msg}")


def resolve_layout(cfg: Config, world_size: int | None = None, mix=None) -> Layout:
    """Check the parallel layout against the world size and derive it: ``dp: auto``, the microbatch count and
    the layer split (``parallel.layer_split``: ``auto`` balances the expected step over ``mix``, a list of
    ``step_mix.StepType``, default ``step_mix.assumed_mix(cfg)``). ``world_size`` None: planning without a job
    (dp: auto counts as 1). Raises ConfigError."""
    p, t = cfg.parallel, cfg.train
    if world_size is None:
        world_size = p.tp * p.pp * (p.dp if isinstance(p.dp, int) else 1)
    if world_size % (p.tp * p.pp) != 0:
        _fail("parallel.tp" if p.pp == 1 else "parallel.pp",
              f"world size {world_size} is not divisible by tp x pp = {p.tp * p.pp}")
    dp = world_size // (p.tp * p.pp) if p.dp == "auto" else p.dp
    if dp * p.tp * p.pp != world_size:
        _fail("parallel.dp",
              f"dp x tp x pp = {dp} x {p.tp} x {p.pp} = {dp * p.tp * p.pp} but the world size is {world_size}")
    for bad in (microbatch_problem(t.global_batch_size, t.micro_batch_size, dp, p.pp, p.vpp, p.schedule),
                dp_shard_problem(p.dp_shard, dp)):
        if bad is not None:
            _fail(bad[0], f"{bad[1]} (world size {world_size})")
    if p.sequence_parallel and p.tp > 1 and t.seq_len % p.tp != 0:
        _fail("train.seq_len", f"sequence parallel needs train.seq_len={t.seq_len} divisible by tp={p.tp}")
    n_mb = t.global_batch_size // (t.micro_batch_size * dp)
    split = resolve_layer_split(cfg, n_mb, mix=mix) if p.pp > 1 else [cfg.model.n_layers]
    return Layout(dp=dp, tp=p.tp, pp=p.pp, vpp=p.vpp, schedule=p.schedule, n_microbatches=n_mb,
                  split=tuple(split), dp_shard=p.dp_shard)


@dataclass
class ParallelContext:
    layout: Layout
    device: torch.device
    mesh: DeviceMesh | None  # None on a single process: every degree is 1 and no collective runs
    _own_dp_mesh: DeviceMesh | None = field(default=None, repr=False)
    _dp_mesh: DeviceMesh | None = field(default=None, repr=False)  # dp_replicate x dp_shard, flattened

    def __post_init__(self) -> None:
        if self.mesh is not None:  # kept here: torch >= 2.11 deprecates slicing a flattened dim from the root
            self._dp_mesh = self.mesh["dp_replicate", "dp_shard"]._flatten("dp")  # (torchtitan's way; private)

    def _local(self, dim: str) -> int:
        return self.submesh(dim).get_local_rank() if self.mesh is not None else 0

    @property
    def pp_rank(self) -> int:
        return self._local("pp")

    @property
    def dp_rank(self) -> int:
        return self._local("dp")

    @property
    def tp_rank(self) -> int:
        return self._local("tp")

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.mesh is not None else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def submesh(self, dim: str) -> DeviceMesh | None:
        """One mesh dimension: "pp", "tp", "dp" (all dp ranks), "dp_replicate" or "dp_shard"."""
        if self.mesh is None:
            return None
        return self._dp_mesh if dim == "dp" else self.mesh[dim]

    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh FSDP2 shards over: the (flattened) dp dimension, under HSDP the 2-D (dp_replicate, dp_shard)
        mesh (FSDP2 shards over the second, replicates over the first), or on a single process a 1-rank mesh
        (so that bf16's mixed-precision policy is FSDP's in every layout). Inside a job of several processes
        that all build a single-process model (tests' references), each rank gets its own 1-rank mesh, built
        collectively."""
        if self.mesh is not None:
            if self.layout.dp_replicate > 1:
                return self.mesh["dp_replicate", "dp_shard"]
            return self._dp_mesh
        if self._own_dp_mesh is None:
            if not dist.is_initialized():
                backend = "nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_dp_mesh = init_device_mesh(self.device.type, (dist.get_world_size(), 1),
                                                 mesh_dim_names=("replica", "dp"))["dp"]
        return self._own_dp_mesh


def world_size_from_env() -> int:
    """The job's process count, from torchrun's variables or (when RANK is absent) an srun step's, which are
    copied into torchrun's names first so that everything downstream reads one view."""
    apply_launch_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(cfg: Config, device: torch.device, mix=None) -> ParallelContext:
    """Check the layout (``mix``: the step mix ``layer_split: auto`` balances), then (for world size > 1) start
    the process group and build the mesh. Every wait is
    bounded (``VLP_PG_TIMEOUT_S`` or ``parallel.timeout_s``) and a timeout names the missing ranks."""
    world = world_size_from_env()
    layout = resolve_layout(cfg, world, mix=mix)
    if world == 1:
        return ParallelContext(layout, device, None)
    if not dist.is_initialized():
        timeout_s = pg_timeout_s(cfg.parallel.timeout_s)
        backend = "nccl" if device.type == "cuda" else "gloo"
        gpu_env_defaults(cfg, device)  # NCCL settings read at process-group start
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = process_group_store(timeout_s)
        dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return ParallelContext(layout, device, build_mesh(layout, device))


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh:
    """The (pp, dp_replicate, dp_shard, tp) mesh (``ParallelContext`` adds "dp", the two dp dims flattened)."""
    return init_device_mesh(device.type, (layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp),
                            mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"))


def local_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no GPU is visible")
        # one GPU per rank: cuda:LOCAL_RANK, or the only visible one (Slurm's --gpus-per-task / --gpu-bind)
        local = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.device_count() > 1 else 0
        return torch.device("cuda", local)
    return torch.device("cpu")
