"""Who is who in the job, so that a rank that sees a collective fail can name the rank that was lost.

Under gloo a peer that dies shows up on the survivors as "Connection closed by peer [ADDR]:PORT" (or "Read
error [ADDR]:PORT: Connection reset by peer"): the address of the dead process's end of one TCP connection
(torch 2.14's gloo prints the port with its bytes swapped: 3475 for 37645; both are tried).
``gather_peers`` (collective, once the process groups exist) gives every rank every rank's host, pid and local
TCP endpoints (from /proc; gloo's connections are among them); ``lost_peer`` maps the address in such an error
to a rank. Where it does not match (NCCL, another platform), a rank on this host whose pid is gone is named;
else the address.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

_PEER_GONE = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe|remote process exited|"
                        r"peer (?:closed|reset)", re.IGNORECASE)
_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:(\d+)")


def gather_peers() -> list[dict]:
    """Every rank's ``{"host", "pid", "endpoints"}`` (index: rank); [] without a process group. Collective."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return []
    gloo = dist.get_backend() == "gloo"  # NCCL's errors carry no address: host and pid suffice
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "endpoints": _tcp_endpoints() if gloo else []}
    peers: list = [None] * dist.get_world_size()
    dist.all_gather_object(peers, mine)
    return peers


def lost_peer(exc: BaseException, peers: list[dict], rank: int) -> str | None:
    """"rank N (host H, pid P)" (or what is known) when ``exc`` says a peer of a collective went away; None
    when it is some other error, or there are no peers (``gather_peers`` of one process)."""
    text = str(exc)
    if not peers or not _PEER_GONE.search(text):  # one process: no peer to lose
        return None
    address = _ADDRESS.search(text)
    if address:
        ip, port = _plain(address.group(1)), int(address.group(2))
        for guess in (port, int.from_bytes(port.to_bytes(2, "little"), "big")):  # gloo prints it byte-swapped
            hit = [r for r, p in enumerate(peers) if r != rank and f"{ip}:{guess}" in p["endpoints"]]
            if len(hit) == 1:
                return _describe(hit[0], peers)
    host = socket.gethostname()
    gone = [r for r, p in enumerate(peers) if r != rank and p["host"] == host and not process_alive(p["pid"])]
    if gone:
        return ", ".join(_describe(r, peers) for r in gone)
    return f"a rank at {_plain(address.group(1))}" if address else "a rank"


def _describe(rank: int, peers: list[dict]) -> str:
    return f"rank {rank} (host {peers[rank]['host']}, pid {peers[rank]['pid']})"


def process_alive(pid: int) -> bool:
    """The process exists and is no zombie (a killed rank stays one until its launcher reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _plain(ip: str) -> str:
    """An address as gloo and /proc print it alike: IPv4-mapped IPv6 as IPv4."""
    return ip[7:] if ip.lower().startswith("::ffff:") and "." in ip else ip


def _tcp_endpoints() -> list[str]:
    """"ADDR:PORT" of this process's TCP sockets (Linux /proc; [] elsewhere)."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return []
    inodes = set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            rows = Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[9] in inodes:
                ip_hex, port_hex = f[1].split(":")
                raw = b"".join(bytes.fromhex(ip_hex[i:i + 8])[::-1] for i in range(0, len(ip_hex), 8))
                out.append(f"{_plain(socket.inet_ntop(family, raw))}:{int(port_hex, 16)}")
    return out
