"""A real two-node Slurm cluster on this machine, for tests: munged, slurmctld and two slurmd (node1, node2),
all started in a temporary directory by process id and stopped the same way.

Settings from ../shared/SLURM_NOTES.md (measured here): daemons run in the foreground as root, both nodes on
127.0.0.1 told apart by their ports, ``cred_expire=10`` so a requeued job may start again after 10 s instead
of 120 s, and no cgroups. Node names do not resolve: jobs find addresses with ``hostname --ip-address``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")


def ensure_installed() -> str | None:
    """None when Slurm can run here (installing it when root), else the reason to skip."""
    if all(shutil.which(t) for t in TOOLS):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root (run launch/setup_slurm.sh)"
    proc = subprocess.run(["bash", str(REPO / "launch" / "setup_slurm.sh")], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 or not all(shutil.which(t) for t in TOOLS):
        return f"could not install Slurm: {(proc.stderr or proc.stdout).strip()[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = Path(root)
        self.cpus = cpus_per_node
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout_s: float = 30.0) -> SlurmCluster:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = r / "munge" / "munge.socket"
        host = socket.gethostname().split(".")[0]
        ctl_port, d1, d2 = _free_port(), _free_port(), _free_port()
        conf = f"""ClusterName=vlptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=10
JobRequeue=1
MinJobAge=600
SchedulerParameters=sched_interval=1
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={d1} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={d2} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""
        (r / "slurm.conf").write_text(conf)
        log = open(r / "log" / "daemons.out", "ab")
        self._spawn(["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                     f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/log/munged.log",
                     f"--seed-file={r}/munge/seed"], log)
        self._wait_for(lambda: sock.exists(), 10, "munged socket")
        self._spawn(["slurmctld", "-D", "-f", str(r / "slurm.conf")], log)
        for node in ("node1", "node2"):
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(r / "slurm.conf")], log)
        self._wait_for(self._nodes_idle, timeout_s, "both nodes idle (sinfo)")
        return self

    def _spawn(self, cmd: list[str], log) -> None:
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _wait_for(self, ok, timeout_s: float, what: str) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if any(p.poll() is not None for p in self.procs):
                break
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"Slurm test cluster: no {what} after {timeout_s:.0f} s\n{self.logs()}")

    def _nodes_idle(self) -> bool:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return out.count("idle") == 2

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"== {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """SIGTERM each daemon (then SIGKILL) by its own process id, newest first, and any job processes they
        left behind in their sessions."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for p in self.procs:  # job steps (slurmstepd) run in the daemons' sessions
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.procs.clear()

    # ------------------------------------------------------------------ jobs
    def cmd(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def submit(self, script: Path, *args: str, env: dict | None = None, sbatch_args: tuple = (),
               cwd: Path | None = None) -> int:
        """``sbatch`` from ``cwd`` (default: the cluster's directory, where the job logs then go)."""
        proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script), *args], capture_output=True,
                              text=True, env={**self.env, **(env or {})}, timeout=30, cwd=str(cwd or self.root))
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.cmd("scontrol", "show", "job", str(job_id), "-o", check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_state(self, job_id: int, states: set[str], timeout_s: float) -> dict[str, str]:
        end = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout_s:.0f} s: {info}\n{self.logs()}")
