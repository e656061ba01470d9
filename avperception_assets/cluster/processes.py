"""What a dead run worker leaves on this machine: whether a process is still the one that
started a run (`process_alive`), and the local Ray it had started (`kill_ray_of`).

A local Ray outlives the process that started it when that process is killed (Ray 2.60.0,
pinned: `ray::DashboardAgent`, `ray::RuntimeEnvAgent` and workers are re-parented, not killed,
and stay alive minutes after a SIGKILL, holding memory; ray-project/ray#2005). They are found
by Ray's session folder, which Ray names after its driver's pid (`session_<date>_<pid>`) and in
which every Ray process keeps its log files open (the agents get an environment of Ray's own,
so an environment variable cannot mark them). Linux only (`/proc`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path


def ray_processes_of(worker_pid: int) -> list[int]:
    """Live processes of the local Ray that the (dead) process `worker_pid` started."""
    session = re.compile(rf"/session_[^/]+_{worker_pid}/")
    found = []
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(session.search(os.readlink(fd)) for fd in fds.iterdir()):
                found.append(int(fds.parent.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def kill_ray_of(worker_pid: int) -> list[int]:
    """SIGKILL the local Ray a dead run worker left running; returns the pids killed. Nothing is
    killed while a live process holds `worker_pid` again: its own Ray's session would match."""
    if process_alive(worker_pid, time.time()):
        return []
    killed = []
    for pid in ray_processes_of(worker_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


def process_alive(pid: int, started_by: float) -> bool:
    """Whether process `pid` exists, is not a zombie and started by `started_by` (a later
    process that reused the pid is not the run's worker)."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.parent.exists():  # not Linux: existence is all we can tell
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    state, start_ticks = fields[0], int(fields[19])
    started = _boot_time() + start_ticks / os.sysconf("SC_CLK_TCK")
    return state != "Z" and started <= started_by + 1.0
