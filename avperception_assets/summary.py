"""`python -m avperception_assets.summary`: the command line of `evaluation.summary`, on the
workspace the environment describes."""

from avperception_assets.evaluation import summary
from avperception_assets.workspace import Workspace


def main() -> int:
    return summary.print_summary(Workspace.from_env().reports_dir)


if __name__ == "__main__":
    raise SystemExit(main())
