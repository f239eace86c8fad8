"""Where this process sits in the job, whatever started it, and the store that starts the process group.

Launchers describe a rank differently: torchrun sets ``RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT``;
``srun`` sets ``SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID`` and the step's node list. ``apply_launch_env``
turns the second into the first (only when ``RANK`` is absent), so the rest of the code reads one view and
``srun python -m vlpretrain train ...`` needs no wrapper.

Every wait here is bounded (``VLP_PG_TIMEOUT_S``, default 600 s) and names what is missing.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from datetime import timedelta

DEFAULT_TIMEOUT_S = 600.0


class LaunchError(RuntimeError):
    """The job's processes cannot find each other (rendezvous, store, missing ranks)."""


# ---------------------------------------------------------------------------------------------- Slurm
def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed host list -> names: ``"gpu-[01-03,7],login1"`` -> gpu-01 gpu-02 gpu-03 gpu-7 login1."""
    names: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", spec):
        m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", part)
        if not m:
            names.append(part)
            continue
        prefix, ranges, rest = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                names.extend(prefix + str(i).zfill(len(lo)) + tail for tail in expand_hostlist(rest or "") or [""])
    return names


def expand_counts(spec: str) -> list[int]:
    """Slurm's task counts per node: ``"8(x2),4"`` -> [8, 8, 4]."""
    out: list[int] = []
    for item in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise LaunchError(f"cannot read Slurm task counts {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def in_slurm_step() -> bool:
    """Started by ``srun`` (a job step), not the batch script itself nor an ``salloc`` shell."""
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ and (
        "SLURM_STEP_NUM_TASKS" in os.environ or "SLURM_NTASKS" in os.environ)


def slurm_master_port(job_id: int, step_id: int = 0) -> int:
    """A port from the job id (the same on every rank; clear of Linux's ephemeral range 32768-60999)."""
    return 20000 + (job_id + step_id) % 10000


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
        return True
    except OSError:
        return False


def slurm_launch_env() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the Slurm step's variables.

    MASTER_ADDR: rank 0 runs on the step's first node (block distribution). Its name is used when it resolves;
    where node names do not resolve, ``SLURM_LAUNCH_NODE_IPADDR`` (the node srun runs on: in a batch job the
    first node of the allocation) is used, and rank 0 checks that it really is its own address."""
    e = os.environ
    env = {"RANK": e["SLURM_PROCID"], "WORLD_SIZE": e.get("SLURM_STEP_NUM_TASKS", e.get("SLURM_NTASKS", "1")),
           "LOCAL_RANK": e.get("SLURM_LOCALID", "0")}
    counts = e.get("SLURM_STEP_TASKS_PER_NODE", e.get("SLURM_TASKS_PER_NODE", ""))
    node = int(e.get("SLURM_NODEID", "0"))
    try:
        env["LOCAL_WORLD_SIZE"] = str(expand_counts(counts)[node])
    except (LaunchError, IndexError):
        pass
    if "MASTER_ADDR" not in e:
        nodes = expand_hostlist(e.get("SLURM_STEP_NODELIST", e.get("SLURM_JOB_NODELIST", "")))
        if nodes and _resolves(nodes[0]):
            env["MASTER_ADDR"] = nodes[0]
        elif e.get("SLURM_LAUNCH_NODE_IPADDR"):
            env["MASTER_ADDR"] = e["SLURM_LAUNCH_NODE_IPADDR"]
            env["VLP_MASTER_ADDR_GUESSED"] = "1"
        else:
            raise LaunchError(f"cannot find rank 0's address: node {nodes[:1]} does not resolve and "
                              "SLURM_LAUNCH_NODE_IPADDR is unset; set MASTER_ADDR to the first node's IP address")
    if "MASTER_PORT" not in e:
        env["MASTER_PORT"] = str(slurm_master_port(int(e.get("SLURM_JOB_ID", "0")), _int(e.get("SLURM_STEP_ID"))))
    return env


def _int(v: str | None) -> int:
    return int(v) if v and v.isdigit() else 0


def global_rank() -> int:
    """This process's global rank before (or without) a process group: torchrun's RANK, else srun's
    SLURM_PROCID, else 0 (one process)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def apply_launch_env() -> None:
    """Fill torchrun's variables from Slurm's when this process was started by srun without them (idempotent)."""
    if "RANK" in os.environ or not in_slurm_step():
        return
    for k, v in slurm_launch_env().items():
        os.environ.setdefault(k, v)


def where(rank: int) -> str:
    """Best guess of the node that should run ``rank`` (for error messages)."""
    e = os.environ
    if "SLURM_STEP_NODELIST" in e or "SLURM_JOB_NODELIST" in e:
        try:
            nodes = expand_hostlist(e.get("SLURM_STEP_NODELIST", e.get("SLURM_JOB_NODELIST", "")))
            counts = expand_counts(e.get("SLURM_STEP_TASKS_PER_NODE", e.get("SLURM_TASKS_PER_NODE", "")))
            first = 0
            for name, n in zip(nodes, counts):
                if rank < first + n:
                    return f"node {name}"
                first += n
        except LaunchError:
            pass
    per = int(e.get("LOCAL_WORLD_SIZE", "0") or 0)
    return f"node rank {rank // per}" if per > 0 else "unknown node"


# ------------------------------------------------------------------------------------------- the store
def pg_timeout_s(cfg_value: float | None = None) -> float:
    """The bound on every start-up wait and collective: ``VLP_PG_TIMEOUT_S``, else the config, else 600 s."""
    if os.environ.get("VLP_PG_TIMEOUT_S"):
        return float(os.environ["VLP_PG_TIMEOUT_S"])
    return float(cfg_value) if cfg_value else DEFAULT_TIMEOUT_S


def gpu_env_defaults(cfg, device, env=None) -> dict[str, str]:
    """NCCL settings for a GPU job, set before ``init_process_group`` only where the user has not set them;
    returns what was set (nothing off GPU). ``env``: the environment to fill (default: this process's).

    - ``TORCH_NCCL_AVOID_RECORD_STREAMS=1`` with tp > 1: TP's async collectives otherwise ``record_stream``
      their buffers, which keeps them from the caching allocator until the comm stream catches up (memory
      spikes); with it, NCCL stashes references and frees them when the streams sync.
    - ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``: a collective that runs past ``parallel.timeout_s`` takes the
      process down (the launcher then ends the job) instead of hanging. 3 (tear down without
      ``ncclCommAbort``) is torch's own default; 1 also aborts the communicators first, which can itself hang.
    """
    if device.type != "cuda":
        return {}
    env = os.environ if env is None else env
    want = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    if cfg.parallel.tp > 1:
        want["TORCH_NCCL_AVOID_RECORD_STREAMS"] = "1"
    done = {}
    for k, v in want.items():
        if k not in env and not (k == "TORCH_NCCL_ASYNC_ERROR_HANDLING" and "NCCL_ASYNC_ERROR_HANDLING" in env):
            env[k] = done[k] = v
    return done


def _route_addr(peer: str, port: int) -> str:
    """This host's address on the route to ``peer`` (reachable from the other nodes; sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, port))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _check_own_address(addr: str) -> None:
    """Rank 0 hosts the store at MASTER_ADDR: fail at once (not after a timeout) when that is another host."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((socket.gethostbyname(addr), 0))
    except OSError as e:
        raise LaunchError(f"rank 0 runs on {socket.gethostname()} but MASTER_ADDR={addr} is not an address of "
                          f"this host ({e.strerror}); set MASTER_ADDR to the first node's IP address") from None


def _client(addr: str, port: int, timeout_s: float, what: str, rank: int) -> object:
    import torch.distributed as dist

    try:
        return dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    except Exception as e:  # DistNetworkError / RuntimeError, by torch version
        raise LaunchError(f"rank {rank} could not reach {what} at {addr}:{port} within "
                          f"{timeout_s:.0f} s ({str(e).splitlines()[0][:200]}); is rank 0 running, and does "
                          "MASTER_ADDR reach it from this node?") from None


def _fresh_store_via_agent(rank: int, world: int, timeout_s: float, env=None):
    """Under torchrun's shared agent store (c10d or static rendezvous, ``--max-restarts``), keys outlive a
    restart and the restart counter differs between agents after a membership change, so nothing keyed by it
    is agreed on. Instead rank 0 of every round starts a fresh store and publishes its address and a random
    token in the agent store; the others connect to the published address until the token matches (a stale
    entry of a dead round points at a closed port or carries another token)."""
    import torch.distributed as dist

    env = os.environ if env is None else env
    addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    deadline = time.monotonic() + timeout_s
    agent = _client(addr, port, timeout_s, "torchrun's agent store", rank)
    key = f"vlpretrain/{env.get('TORCHELASTIC_RUN_ID', 'none')}/pg_store"
    if rank == 0:
        store = dist.TCPStore("0.0.0.0", 0, world, is_master=True, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        token = uuid.uuid4().hex
        store.set("vlpretrain/token", token)
        agent.set(key, json.dumps({"addr": _route_addr(addr, port), "port": store.port, "token": token}))
        return store
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LaunchError(f"rank {rank}: rank 0 ({where(0)}) published no process-group store within "
                              f"{timeout_s:.0f} s (agent store {addr}:{port}, key {key})")
        try:
            agent.set_timeout(timedelta(seconds=left))
            info = json.loads(agent.get(key))
        except Exception:
            raise LaunchError(f"rank {rank}: rank 0 ({where(0)}) published no process-group store within "
                              f"{timeout_s:.0f} s (agent store {addr}:{port}, key {key})") from None
        try:
            store = dist.TCPStore(info["addr"], info["port"], is_master=False,
                                  timeout=timedelta(seconds=min(3.0, max(left, 0.1))))
            store.set_timeout(timedelta(seconds=min(3.0, max(left, 0.1))))
            if store.get("vlpretrain/token").decode() == info["token"]:
                store.set_timeout(timedelta(seconds=timeout_s))
                return store
        except Exception:  # a dead round's entry: wait for rank 0 of this round to publish
            pass
        time.sleep(0.2)


def process_group_store(timeout_s: float, env=None):
    """The store for ``init_process_group``, after every rank has checked in (else: which ranks are missing).
    ``env``: the launcher's variables (default: this process's environment)."""
    import torch.distributed as dist

    env = os.environ if env is None else env
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = _fresh_store_via_agent(rank, world, timeout_s, env)
    elif rank == 0:
        if env.get("VLP_MASTER_ADDR_GUESSED"):
            _check_own_address(addr)
        try:
            store = dist.TCPStore(addr, port, world, is_master=True, timeout=timedelta(seconds=timeout_s),
                                  wait_for_workers=False)
        except Exception as e:
            raise LaunchError(f"rank 0 could not start the store on port {port} ({str(e).splitlines()[0][:200]}); "
                              "another job on this node may use it: set MASTER_PORT") from None
    else:
        store = _client(addr, port, timeout_s, "rank 0's store", rank)
    store.set(f"vlpretrain/joined/{rank}", socket.gethostname())
    keys = [f"vlpretrain/joined/{r}" for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception:
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        shown = ", ".join(f"{r} ({where(r)})" for r in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise LaunchError(f"rank {rank}: {len(missing)} of {world} ranks did not start within {timeout_s:.0f} s "
                          f"(store {addr}:{port}): missing ranks {shown}") from None
    return store
