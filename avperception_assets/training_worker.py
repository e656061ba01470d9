"""`python -m avperception_assets.training_worker`: the command-line entry point of `model.worker`."""

from avperception_assets.model.worker import main

if __name__ == "__main__":
    main()
