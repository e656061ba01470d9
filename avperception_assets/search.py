"""`python -m avperception_assets.search`: the command line of `discovery.search`, on the workspace
the environment describes."""

from avperception_assets.discovery import search
from avperception_assets.workspace import Workspace


def main(argv: list[str] | None = None) -> int:
    workspace = Workspace.from_env()
    return search.main(argv, uri=workspace.lancedb_uri, model=workspace.embedding_model)


if __name__ == "__main__":
    raise SystemExit(main())
