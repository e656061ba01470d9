"""`python -m avperception_assets.exports`: the command-line entry point of `slices.exports`."""

from avperception_assets import patches

patches.apply_at_startup()  # an entry point: before slices.exports imports lancedb and geneva

from avperception_assets.slices.exports import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
