"""The Kubernetes client that `import geneva` drags in and a local run never calls
(`patches.kubernetes`): imported whole by geneva 0.17 on kubernetes 35 (the symptom; once an
upgrade stops it, the first test fails and says the patch can go), deferred once the patch is
applied, and whole for code that uses it."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.fresh_interpreter

K8S_MODELS = "kubernetes.client.models.v1_pod_spec"  # one of the 721 models `kubernetes.client` imports
K8S_CONFIG = "kubernetes.config.kube_config"  # imports google-auth and cryptography


def run(probe: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          timeout=300).stdout.split()


def test_importing_geneva_imports_the_whole_kubernetes_client():
    probe = f"import sys, geneva.runners.ray.pipeline; print({K8S_MODELS!r} in sys.modules, {K8S_CONFIG!r} in sys.modules)"
    assert run(probe) == ["True", "True"], "geneva no longer imports the Kubernetes client whole: delete kubernetes.defer_client"


def test_with_the_patch_importing_geneva_leaves_the_client_unimported():
    probe = ("import sys; from avperception_assets.patches import kubernetes; kubernetes.defer_client(); "
             f"import geneva.runners.ray.pipeline; print({K8S_MODELS!r} in sys.modules, {K8S_CONFIG!r} in sys.modules)")
    assert run(probe) == ["False", "False"]


def test_with_the_patch_the_client_stays_whole_for_code_that_uses_it():
    probe = ("from avperception_assets.patches import kubernetes as patch; patch.defer_client(); "
             "import geneva.runners.ray.pipeline, kubernetes; "
             "from kubernetes import client, config; from kubernetes.utils import create_from_yaml; "
             "print(client.V1PodSpec.__module__, callable(create_from_yaml), callable(config.load_kube_config)); "
             "print(client.models.V1Pod is client.V1Pod, client.api.CoreV1Api is client.CoreV1Api); "
             "pod = client.ApiClient().deserialize(type('R', (), {'data': '{\"spec\": {\"hostname\": \"h\", \"containers\": []}}'})(), 'V1Pod'); "
             "from importlib.metadata import version; print(pod.spec.hostname, kubernetes.__version__ == version('kubernetes'))")
    assert run(probe) == [K8S_MODELS, "True", "True", "True", "True", "h", "True"]
