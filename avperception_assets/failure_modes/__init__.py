"""The failure-mode registry: which long-tail modes the platform targets, loaded from TOML."""
