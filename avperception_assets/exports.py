"""`python -m avperception_assets.exports`: the command line of `slices.exports`, on the workspace
the environment describes."""

from avperception_assets import patches

patches.apply_at_startup()  # an entry point: before slices.exports imports lancedb and geneva

from avperception_assets.slices import exports  # noqa: E402
from avperception_assets.workspace import Workspace  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    workspace = Workspace.from_env()
    return exports.main(argv, uri=workspace.lancedb_uri, exports_dir=workspace.exports_dir)


if __name__ == "__main__":
    raise SystemExit(main())
