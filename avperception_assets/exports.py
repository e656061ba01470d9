"""`python -m avperception_assets.exports`: the command-line entry point of `slices.exports`."""

from avperception_assets.slices.exports import main

if __name__ == "__main__":
    raise SystemExit(main())
