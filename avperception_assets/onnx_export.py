"""`python -m avperception_assets.onnx_export`: the command-line entry point of `deployment.onnx`."""

from avperception_assets import patches

patches.apply_at_startup()  # an entry point: before deployment.onnx imports lancedb

from avperception_assets.deployment.onnx import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
