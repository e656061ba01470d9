"""`python -m avperception_assets.search`: the command line of `discovery.search`, on the workspace
the environment describes."""

from avperception_assets import patches

patches.apply_at_startup()  # an entry point: before discovery.search imports lancedb and geneva

from avperception_assets.discovery import search  # noqa: E402
from avperception_assets.workspace import Workspace  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    workspace = Workspace.from_env()
    return search.main(argv, uri=workspace.lancedb_uri, model=workspace.embedding_model)


if __name__ == "__main__":
    raise SystemExit(main())
