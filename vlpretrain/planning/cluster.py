"""The cluster a plan is for: GPU peak, memory and HBM bandwidth, GPUs per node, and the bandwidth and
latency of a collective inside a node (NVLink / NVSwitch) and across nodes (the network, per GPU).

Presets are datasheet peaks (dense bf16) and achievable bus bandwidths (what nccl-tests reports as busbw for
large messages; about 75-80% of the link's one-way rate): A100 NVLink3 600 GB/s bidirectional -> 230 GB/s,
H100/H200 NVLink4 900 GB/s -> 370 GB/s; one HDR 200 Gb/s NIC per A100 -> 22 GB/s, one NDR 400 Gb/s NIC per
H100 -> 45 GB/s. Latencies are per ring hop. Anything can be overridden by a flag or a small YAML file
(``--cluster``) whose keys are the ``Cluster`` fields.

Collective times (``collective_s``) use the ring model NCCL's large-message algorithms follow: an all-gather
or reduce-scatter of a ``size``-byte tensor over ``n`` ranks costs (n - 1) x latency + (n - 1)/n x size / bw,
an all-reduce twice that; a group that spans nodes runs at the network's rate and latency.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlpretrain.errors import UserError


@dataclass(frozen=True)
class Cluster:
    gpu: str = "h100-sxm"
    family: str = "h100"  # the efficiency table's row (a100, h100, b200, gb200, gb300)
    peak_tflops: float = 989.0  # dense bf16
    mem_gib: float = 79.6  # usable device memory (what the driver reports)
    hbm_gbps: float = 3350.0  # GB/s: the optimizer step is memory-bound
    gpus_per_node: int = 8
    intra_gbps: float = 370.0  # bus bandwidth of a collective inside a node, GB/s per GPU
    intra_latency_us: float = 3.0
    inter_gbps: float = 45.0  # bus bandwidth across nodes, GB/s per GPU
    inter_latency_us: float = 8.0
    nodes: int = 0  # 0: as many as the world size needs


PRESETS: dict[str, Cluster] = {c.gpu: c for c in (
    Cluster("a100-40gb", "a100", 312.0, 40.0, 1555.0, 8, 230.0, 3.0, 22.0, 8.0),
    Cluster("a100-80gb", "a100", 312.0, 80.0, 2039.0, 8, 230.0, 3.0, 22.0, 8.0),
    Cluster("h100-sxm", "h100", 989.0, 79.6, 3350.0, 8, 370.0, 3.0, 45.0, 8.0),
    Cluster("h200", "h100", 989.0, 140.0, 4800.0, 8, 370.0, 3.0, 45.0, 8.0),
    # for the published runs on Blackwell systems (bf16 dense datasheet peaks)
    Cluster("b200", "b200", 2250.0, 180.0, 8000.0, 8, 740.0, 3.0, 45.0, 8.0),
    Cluster("gb200", "gb200", 2500.0, 186.0, 8000.0, 4, 740.0, 3.0, 45.0, 8.0),
    Cluster("gb300", "gb300", 2500.0, 279.0, 8000.0, 4, 740.0, 3.0, 90.0, 8.0),
)}
_FIELDS = {f.name: f.type for f in dataclasses.fields(Cluster)}


def get_cluster(gpu: str = "h100-sxm", cluster_file: str | None = None, **overrides) -> Cluster:
    """A preset (``gpu``), then the YAML file's keys, then the non-None ``overrides`` (UserError on bad input)."""
    if gpu not in PRESETS:
        raise UserError(f"--gpu: unknown GPU {gpu!r} (presets: {', '.join(PRESETS)}; others: pick the nearest "
                        f"and set --gpu-peak-tflops / --gpu-mem-gib)")
    values: dict = {}
    if cluster_file:
        path = Path(cluster_file)
        if not path.is_file():
            raise UserError(f"--cluster: {path} is not a file")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise UserError(f"--cluster: {path} must be a mapping of Cluster fields")
        if "gpu" in data:
            gpu = str(data["gpu"])
            if gpu not in PRESETS:
                raise UserError(f"{path}: gpu: unknown GPU {gpu!r} (presets: {', '.join(PRESETS)})")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise UserError(f"{path}: unknown key {unknown[0]!r} (keys: {', '.join(_FIELDS)})")
        values.update({k: v for k, v in data.items() if k != "gpu"})
    values.update({k: v for k, v in overrides.items() if v is not None})
    base = PRESETS[gpu]
    for key, v in values.items():
        want = type(getattr(base, key))
        try:
            values[key] = want(v)
        except (TypeError, ValueError):
            raise UserError(f"cluster: {key}: {v!r} is not a {want.__name__}") from None
        if want in (int, float) and values[key] < 0:
            raise UserError(f"cluster: {key}: must be >= 0, got {v}")
    out = dataclasses.replace(base, **values)
    if out.gpus_per_node < 1 or out.peak_tflops <= 0 or out.mem_gib <= 0:
        raise UserError("cluster: gpus_per_node, peak_tflops and mem_gib must be positive")
    return out


def link(cl: Cluster, span: int) -> tuple[float, float]:
    """(bytes/s, seconds per hop) of a group whose members lie within ``span`` consecutive ranks."""
    if span <= cl.gpus_per_node:
        return cl.intra_gbps * 1e9, cl.intra_latency_us * 1e-6
    return cl.inter_gbps * 1e9, cl.inter_latency_us * 1e-6


def collective_s(kind: str, size: float, n: int, cl: Cluster, span: int) -> float:
    """Seconds of one ``kind`` ("all_gather", "reduce_scatter", "all_reduce", "send") of ``size`` bytes (the
    full tensor) over ``n`` ranks that lie within ``span`` consecutive ranks (see the module docstring)."""
    if size <= 0 or (n <= 1 and kind != "send"):
        return 0.0
    bw, lat = link(cl, span)
    if kind == "send":
        return lat + size / bw
    one = (n - 1) * lat + (n - 1) / n * size / bw
    return 2 * one if kind == "all_reduce" else one
