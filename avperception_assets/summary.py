"""`python -m avperception_assets.summary`: the command-line entry point of `evaluation.summary`."""

from avperception_assets.evaluation.summary import main

if __name__ == "__main__":
    raise SystemExit(main())
