"""Ray 2.60's patch (`patches.ray`): what it mends, in a fresh interpreter (Ray reads its
authentication mode when imported). Its symptom needs a head: `test_ray_head.py`."""

import os
import subprocess
import sys

import pytest

from avperception_assets.patches import ray as ray_patches

TOKEN_MODE = ("import ray\nfrom ray._raylet import AuthenticationMode, get_authentication_mode\n"
              "{before}\nprint(get_authentication_mode() == AuthenticationMode.TOKEN)")


def _token_mode(before: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | env
    result = subprocess.run([sys.executable, "-c", TOKEN_MODE.format(before=before)], env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()[-1]


@pytest.mark.fresh_interpreter
def test_a_found_token_turns_token_mode_on_and_an_explicit_mode_is_kept():
    mend = "from avperception_assets.patches import ray as p\np.use_token_if_found()"
    token = "ab" * 16
    assert ray_patches.DRIVER_TOKEN.applies()
    assert _token_mode("", RAY_AUTH_TOKEN=token) == "False"  # what a driver given an address starts with
    assert _token_mode(mend, RAY_AUTH_TOKEN=token) == "True"
    assert _token_mode(mend, RAY_AUTH_TOKEN=token, RAY_AUTH_MODE="disabled") == "False"
