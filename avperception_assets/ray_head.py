"""The shared Ray head (`cluster.head`) from the command line: `make ray`, `make ray-stop`.

    python -m avperception_assets.ray_head start [--port 6379] [--num-cpus N] [--client-port 10001]
    python -m avperception_assets.ray_head stop [--port 6379]

`start` returns once the head accepts drivers and prints the workspace's Ray address setting
to export; the dashboard UI follows the workspace's `ray_dashboard`.
"""

from __future__ import annotations

import argparse

from avperception_assets.cluster import head as shared_head
from avperception_assets.workspace import Workspace, variable_for


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m avperception_assets.ray_head",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--port", type=int, default=shared_head.DEFAULT_PORT, help="the head's GCS port")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for jobs (default: all)")
    parser.add_argument("--client-port", type=int, default=None,
                        help="port of the Ray Client server Ray starts beside the head (default 10001; runs never use it)")
    args = parser.parse_args(argv)
    temp_dir = shared_head.default_temp_dir(args.port)
    if args.action == "stop":
        running = shared_head.running_head(temp_dir)
        killed = shared_head.stop_head(temp_dir)
        print(f"stopped the Ray head at {running.address}" + (f" ({len(killed)} processes killed)" if killed else "")
              if running else f"no Ray head recorded in {temp_dir}")
        return
    try:
        head = shared_head.start_head(args.port, args.num_cpus, dashboard=Workspace.from_env().ray_dashboard,
                                      client_port=args.client_port, temp_dir=temp_dir)
    except shared_head.HeadError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"Ray head running (pid {head.pid}, log {head.log}); attach runs to it with\n"
          f"  export {variable_for('ray_address')}={head.address}")


if __name__ == "__main__":
    main()
