"""Print the failure-mode summary that `failure_mode_summary` wrote (the end of `make demo`)."""

import sys
from pathlib import Path

SUMMARY_FILE = "summary.md"  # what `reports.write_summary` writes under reports/


def print_summary(reports_dir: Path) -> int:
    """Print `<reports_dir>/summary.md`; 1 when it is not there yet."""
    path = reports_dir / SUMMARY_FILE
    if not path.is_file():
        print(f"no summary at {path}: materialize failure_mode_summary first", file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"reports: {reports_dir}")
    return 0
