"""ray 2.60.0: a driver given a head's address uses the token Ray keeps only if its environment
said so before Ray was imported.

`ray start --head` turns token authentication on when a token is found (`RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`, which a local `ray.init()` writes on first use), and
so does a driver calling `ray.init()` or `ray.init(address="auto")`. A driver given the address,
`ray.init(address="host:port")` as runs attach to the shared head, sends no token unless
`RAY_AUTH_MODE=token` was in its environment when `ray` was imported (Ray reads its configuration
then). Symptom: for 20 s "Failed to get cluster ID from GCS server: Unauthenticated: RPC error:
InvalidAuthToken", then `ConnectionError: Failed to connect to Ray cluster`. Mended by doing what
`ray.init` does for "auto" before attaching: `maybe_enable_token_auth_if_token_available`, private,
which turns token mode on for this process when a token is found and `RAY_AUTH_MODE` is unset (an
explicit `RAY_AUTH_MODE` is kept).

`ray.driver_token` (the code is correct without it): on another version a run attaching to a
head with token authentication needs `RAY_AUTH_MODE=token` in its environment.

Upstream: none filed upstream (Ray's code comment says an explicit address never auto-enables
authentication, on purpose).
"""

from __future__ import annotations

from avperception_assets.patches.versions import Patch

DRIVER_TOKEN = Patch(
    "ray.driver_token", {"ray": "2.60.0"}, correctness=False,
    without="a run attaching to a Ray head with token authentication needs RAY_AUTH_MODE=token in its environment")

PATCHES = (DRIVER_TOKEN,)


def use_token_if_found() -> None:
    """Before `ray.init(address=...)`: send the token Ray finds, as `address="auto"` would."""
    if DRIVER_TOKEN.applies():
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
