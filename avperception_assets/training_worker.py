"""`python -m avperception_assets.training_worker`: the command-line entry point of `model.worker`."""

from avperception_assets import patches

patches.apply_at_startup()  # an entry point: before model.worker imports lancedb

from avperception_assets.model.worker import main  # noqa: E402

if __name__ == "__main__":
    main()
