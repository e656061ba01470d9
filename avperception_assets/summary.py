"""`python -m avperception_assets.summary`: the command line of `evaluation.summary`, on the
workspace the environment describes."""

from avperception_assets.evaluation import summary
from avperception_assets.storage import artifacts
from avperception_assets.workspace import Workspace


def main() -> int:
    """On an object-store data location, summary.md is pulled from the bucket first."""
    workspace = Workspace.from_env()
    artifacts.pull(workspace, workspace.reports_dir / summary.SUMMARY_FILE)
    return summary.print_summary(workspace.reports_dir)


if __name__ == "__main__":
    raise SystemExit(main())
