"""Print the failure-mode summary that `failure_mode_summary` wrote (the end of `make demo`)."""

import sys

from avperception_assets.workspace import Workspace


def main() -> int:
    reports = Workspace.from_env().reports_dir
    path = reports / "summary.md"
    if not path.is_file():
        print(f"no summary at {path}: materialize failure_mode_summary first", file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"reports: {reports}")
    return 0
