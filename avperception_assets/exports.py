"""`python -m avperception_assets.exports`: the command line of `slices.exports`, on the workspace
the environment describes."""

from avperception_assets import patches

patches.apply_at_startup()  # an entry point: before slices.exports imports lancedb and geneva

from avperception_assets.slices import exports  # noqa: E402
from avperception_assets.storage import artifacts  # noqa: E402
from avperception_assets.workspace import Workspace  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """On an object-store data location the export is written to the working copy of exports/,
    then uploaded there."""
    workspace = Workspace.from_env()
    status = exports.main(argv, uri=workspace.lancedb_uri, exports_dir=workspace.exports_dir)
    artifacts.push(workspace, workspace.exports_dir)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
