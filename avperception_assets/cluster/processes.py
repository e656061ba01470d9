"""What a dead run worker leaves on this machine: whether a process is still the one that
started a run (`process_alive`), and the local Ray it had started (`kill_ray_of`).

A local Ray outlives the process that started it when that process is killed (Ray 2.60.0,
pinned: `ray::DashboardAgent`, `ray::RuntimeEnvAgent` and workers are re-parented, not killed,
and stay alive minutes after a SIGKILL, holding memory; ray-project/ray#2005). They are found
by Ray's session folder, which Ray names after its driver's pid (`session_<date>_<pid>`) and in
which every Ray process keeps its log files open (the agents get an environment of Ray's own,
so an environment variable cannot mark them). Linux only (`/proc`).

A shared head (`cluster.head`, `make ray`) is never taken for a run's Ray: a run attached to it
as a driver names no session after itself, and the head's session, named after its
`ray start --block` process, is older than any run that could later get that pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from datetime import datetime
from pathlib import Path


def _open_files_matching(pattern: re.Pattern) -> dict[int, set[str]]:
    """Live process → what `pattern`'s first group matched in the paths of the files it holds open."""
    found: dict[int, set[str]] = {}
    for fds in Path("/proc").glob("[0-9]*/fd"):
        try:
            matches = {m.group(1) for fd in fds.iterdir() if (m := pattern.search(os.readlink(fd)))}
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if matches:
            found[int(fds.parent.name)] = matches
    return found


def _session_started(name: str) -> float:
    """When Ray made a session folder, from its name (`session_<local date and time>_<pid>`)."""
    stamp = name.removeprefix("session_").rsplit("_", 1)[0]
    return datetime.strptime(stamp, "%Y-%m-%d_%H-%M-%S_%f").timestamp()


def ray_processes_of(worker_pid: int, started_after: float | None = None) -> list[int]:
    """Live processes of the local Ray that the (dead) process `worker_pid` started: those of a
    session named after that pid and, when `started_after` (the run's start) is given, made after
    it. A shared head's session is named after its `ray start` process, whose pid a later run
    worker can get once that process has exited; such a session is older than the run."""
    held = _open_files_matching(re.compile(rf"/(session_[^/]+_{worker_pid})/"))
    return [pid for pid, sessions in held.items()
            if started_after is None or any(_session_started(s) >= started_after for s in sessions)]


def kill_ray_of(worker_pid: int, started_after: float | None = None) -> list[int]:
    """SIGKILL the local Ray a dead run worker left running (see `ray_processes_of`); returns the
    pids killed. Nothing is killed while a live process holds `worker_pid` again: its own Ray's
    session would match."""
    if process_alive(worker_pid, time.time()):
        return []
    killed = []
    for pid in ray_processes_of(worker_pid, started_after):
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
