"""`python -m avperception_assets.clean`: what `make clean` runs for an object-store data location
(`storage.artifacts.remove`): deletes the project's prefixes in the bucket (landing, lancedb,
checkpoints, reports, exports) and the location's working copy in the cache."""

from avperception_assets.storage import artifacts
from avperception_assets.workspace import Workspace


def main() -> int:
    for removed in artifacts.remove(Workspace.from_env()):
        print(f"removed {removed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
