"""CPU time and memory of a process, read from /proc (Linux only)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    cpu_s: float  # user + system time of all its threads so far
    rss_bytes: int


def usage(pid: int) -> Usage:
    return Usage(cpu_s=cpu_seconds(pid), rss_bytes=rss_bytes(pid))


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces and parentheses: split after it.
    fields = stat.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS_PER_S


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, all cores summed (/proc/stat):
    busy is everything but idle and iowait."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / _TICKS_PER_S, sum(values) / _TICKS_PER_S


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child_pid(fragment: str) -> int | None:
    """The pid of this process's child whose command line contains `fragment`.

    EnvoyProcess keeps its pid private; the config path it was started with is unique."""
    for pid, cmdline in _children():
        if fragment in cmdline:
            return pid
    return None


def terminate_children(timeout_s: float = 5.0) -> list[int]:
    """Last resort after an interrupted shutdown (a second Ctrl-C): SIGTERM, then
    SIGKILL, each process this one started that is still running. Returns their pids."""
    pids = [pid for pid, _ in _children()]
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    _signal_all([pid for pid in pids if _alive(pid)], signal.SIGKILL)
    return pids


def _children() -> list[tuple[int, str]]:
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or not ours to read
        if ppid == me:
            found.append((int(entry.name), cmdline))
    return found


def _alive(pid: int) -> bool:
    # A child that exited but was not reaped is a zombie: state "Z" counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants now (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += parents.get(current, [])
    return found


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of these processes (those that exited meanwhile count 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


def tree_rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += rss_bytes(pid)
    return total


def describe(pids: list[int]) -> list[str]:
    """`<role> <RSS> MiB` of each process: serve, worker, envoy, or its program name."""
    found = []
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            rss = rss_bytes(pid)
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args if a]
        if "worker" in words:
            role = "worker"
        elif "serve" in words:
            role = "serve"
        elif any(w.endswith("envoy") for w in words):
            role = "envoy"
        else:
            role = Path(words[0]).name if words else str(pid)
        found.append(f"{role} {rss / 2**20:.0f} MiB")
    return found
