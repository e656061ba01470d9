"""The REST client that `import lancedb` drags in is deferred in our processes and in every
Ray worker, and stays whole for code that uses it."""

import subprocess
import sys

ENDPOINTS = "lance_namespace_urllib3_client.api.table_api"


def test_importing_lancedb_after_the_package_defers_the_rest_client():
    probe = (f"import sys, avperception_assets, lancedb, geneva; print({ENDPOINTS!r} in sys.modules); "
             "from lance_namespace_urllib3_client import ApiClient, TableApi; "
             f"print({ENDPOINTS!r} in sys.modules, TableApi.__module__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.split() == ["False", "True", ENDPOINTS]


def test_ray_workers_defer_it_before_geneva_is_imported(local_ray):
    import ray

    @ray.remote(num_cpus=0)
    def endpoints_after_importing_geneva() -> bool:
        import geneva  # noqa: F401

        return ENDPOINTS in sys.modules

    assert ray.get(endpoints_after_importing_geneva.remote()) is False
