"""What `import geneva` drags in and a local run never calls (lancedb's REST client, the
Kubernetes client) is deferred in our processes and in every Ray worker, and stays whole for
code that uses it."""

import subprocess
import sys

ENDPOINTS = "lance_namespace_urllib3_client.api.table_api"
K8S_MODELS = "kubernetes.client.models.v1_pod_spec"  # one of the 721 models `kubernetes.client` imports
K8S_CONFIG = "kubernetes.config.kube_config"  # imports google-auth and cryptography
DEFERRED = (ENDPOINTS, K8S_MODELS, K8S_CONFIG)


def _run(probe: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          timeout=300).stdout.split()


def test_importing_geneva_after_the_package_defers_them():
    probe = (f"import sys, avperception_assets, geneva, geneva.runners.ray.pipeline; "
             f"print(*[m in sys.modules for m in {DEFERRED!r}])")
    assert _run(probe) == ["False", "False", "False"]


def test_the_deferred_packages_stay_whole_for_code_that_uses_them():
    probe = ("import avperception_assets, geneva.runners.ray.pipeline, kubernetes; "
             "from lance_namespace_urllib3_client import ApiClient, TableApi; print(TableApi.__module__); "
             "from kubernetes import client, config; from kubernetes.utils import create_from_yaml; "
             "print(client.V1PodSpec.__module__, callable(create_from_yaml), callable(config.load_kube_config)); "
             "print(client.models.V1Pod is client.V1Pod, client.api.CoreV1Api is client.CoreV1Api); "
             "pod = client.ApiClient().deserialize(type('R', (), {'data': '{\"spec\": {\"hostname\": \"h\", \"containers\": []}}'})(), 'V1Pod'); "
             "from importlib.metadata import version; print(pod.spec.hostname, kubernetes.__version__ == version('kubernetes'))")
    assert _run(probe) == [ENDPOINTS, K8S_MODELS, "True", "True", "True", "True", "h", "True"]


def test_ray_workers_defer_them_before_geneva_is_imported(local_ray):
    import ray

    @ray.remote(num_cpus=0)
    def deferred_after_importing_geneva() -> list[bool]:
        import geneva.runners.ray.pipeline  # noqa: F401

        return [m in sys.modules for m in DEFERRED]

    assert ray.get(deferred_after_importing_geneva.remote()) == [False, False, False]
