"""A long-lived Ray head on this machine that runs, backfills and view refreshes attach to as
drivers (the workspace's `ray_address`, `127.0.0.1:<port>`) instead of starting a Ray each: `make ray` and
`make ray-stop` (`python -m avperception_assets.ray_head`).

The head is `ray start --head --block`, in a process group of its own: that process stays up
as long as the head (so no run worker can get the pid its session is named after) and stops
the head's processes when signalled. It advertises `geneva_ray_head`, so Geneva pins each job's
driver task there without a CPU. Everything it writes (Ray's sessions and logs, `head.pid`,
`head.log`) lives in its own temp dir, `/tmp/avp-ray-<port>` by default (short: Ray's socket
paths have a length limit), so stopping it never touches another Ray on the machine.

Ray 2.60 binds the GCS and raylet on every interface and advertises the machine's address even
when given 127.0.0.1, so the head runs with Ray's token authentication (`RAY_AUTH_MODE=token`,
the token Ray keeps: `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`, made if
missing); drivers of the same user send it (`patches.ray`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from avperception_assets.cluster.processes import process_alive
from avperception_assets.cluster.ray import head_answers

DEFAULT_PORT = 6379  # Ray's own default GCS port
HEAD_RESOURCES = json.dumps({"geneva_ray_head": 1})
STARTED_LINE = "Ray runtime started"  # what `ray start` prints once every head process runs
RAY = str(Path(sys.executable).with_name("ray"))


class HeadError(RuntimeError):
    """The head cannot be started or stopped as asked (the message says why)."""


@dataclass(frozen=True)
class Head:
    address: str  # the GCS address drivers attach to (the workspace's `ray_address`)
    pid: int  # the `ray start --block` process, leader of the head's process group
    started: float  # when that process started (a later process with its pid is not the head)
    temp_dir: Path

    @property
    def log(self) -> Path:
        return self.temp_dir / "head.log"


def default_temp_dir(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"avp-ray-{port}"


def _record(temp_dir: Path) -> Path:
    return temp_dir / "head.pid"


def running_head(temp_dir: Path) -> Head | None:
    """The head this temp dir records, if its process still runs."""
    try:
        head = json.loads(_record(temp_dir).read_text())
    except FileNotFoundError:
        return None
    head = Head(head["address"], head["pid"], head["started"], temp_dir)
    return head if process_alive(head.pid, head.started) else None


def start_head(port: int = DEFAULT_PORT, num_cpus: int | None = None, dashboard: bool = False,
               client_port: int | None = None, temp_dir: Path | None = None, wait_s: float = 180) -> Head:
    """Start the head on 127.0.0.1:`port` with `num_cpus` CPUs for jobs (default: all) and Ray's
    dashboard UI if `dashboard`; returns once it accepts drivers. `client_port` moves the Ray
    Client server Ray starts beside it (unused here; default 10001)."""
    temp_dir = Path(temp_dir or default_temp_dir(port))
    address = f"127.0.0.1:{port}"
    if head_answers(address):
        raise HeadError(f"something already listens on {address}: a head started before (`make ray-stop` stops "
                        f"it), or another server; choose another port (--port; RAY_PORT=… for make ray)")
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True,  # made only if missing
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    command = [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
               "--disable-usage-stats", f"--temp-dir={temp_dir}", f"--resources={HEAD_RESOURCES}",
               f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1"]
    command += [f"--num-cpus={num_cpus}"] if num_cpus is not None else []
    command += [f"--ray-client-server-port={client_port}"] if client_port else []
    log = temp_dir / "head.log"
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    head = Head(address, process.pid, time.time(), temp_dir)
    _record(temp_dir).write_text(json.dumps({"address": address, "pid": head.pid, "started": head.started}))
    deadline = time.monotonic() + wait_s
    while STARTED_LINE not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_head(temp_dir)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise HeadError(f"the Ray head on {address} did not start (exit code {process.returncode}); "
                            f"{log}:\n{tail}")
        time.sleep(0.25)
    return head


def _group(pgid: int) -> list[int]:
    """Live processes of process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_head(temp_dir: Path, grace_s: float = 20) -> list[int]:
    """Stop the head recorded in `temp_dir`: SIGTERM to its `ray start --block` process, which
    stops the node's processes (about 2 s here; SIGTERM to the whole group at once left the GCS
    running for more than 20 s), then SIGKILL to the group's processes still running after
    `grace_s`. Drivers attached to it are other processes' and are left alone. Returns the pids
    that had to be killed."""
    head = running_head(Path(temp_dir))
    if head is None:
        return []
    os.kill(head.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := _group(head.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _record(Path(temp_dir)).unlink(missing_ok=True)
    return left
