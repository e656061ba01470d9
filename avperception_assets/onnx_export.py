"""`python -m avperception_assets.onnx_export`: the command-line entry point of `deployment.onnx`."""

from avperception_assets.deployment.onnx import main

if __name__ == "__main__":
    raise SystemExit(main())
