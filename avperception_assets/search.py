"""`python -m avperception_assets.search`: the command-line entry point of `discovery.search`."""

from avperception_assets import patches

patches.apply_at_startup()  # an entry point: before discovery.search imports lancedb and geneva

from avperception_assets.discovery.search import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
