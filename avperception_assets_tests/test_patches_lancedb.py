"""lancedb's REST namespace client, which `import lancedb` imports whole and a local database
never calls (`patches.lancedb`): the symptom on lancedb 0.39 (once an upgrade stops it, the
first test fails and says the patch can go), deferred once the patch is applied, and whole for
code that uses it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.fresh_interpreter

ENDPOINTS = "lance_namespace_urllib3_client.api.table_api"


def run(probe: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          timeout=300).stdout.split()


def test_importing_lancedb_imports_every_endpoint_of_its_rest_client():
    assert run(f"import sys, lancedb; print({ENDPOINTS!r} in sys.modules)") == ["True"], (
        "lancedb no longer imports its REST client's endpoints: delete lancedb.defer_rest_client")


def test_with_the_patch_importing_lancedb_leaves_the_endpoints_unimported():
    probe = (f"import sys; from avperception_assets.patches import lancedb as patch; patch.defer_rest_client(); "
             f"import lancedb; lancedb.connect('memory://'); print({ENDPOINTS!r} in sys.modules)")
    assert run(probe) == ["False"]


def test_with_the_patch_the_client_stays_whole_for_code_that_uses_it():
    probe = ("from avperception_assets.patches import lancedb as patch; patch.defer_rest_client(); import lancedb; "
             "from lance_namespace_urllib3_client import ApiClient, TableApi; "
             "print(TableApi.__module__, type(TableApi(ApiClient())).__name__)")
    assert run(probe) == [ENDPOINTS, "TableApi"]
