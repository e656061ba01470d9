"""`python -m avperception_assets.search`: the command-line entry point of `discovery.search`."""

from avperception_assets.discovery.search import main

if __name__ == "__main__":
    raise SystemExit(main())
