"""The patches as a whole (`patches`): importing the package changes no other library; entry
points apply them, checked against the installed versions, and a patch meeting a version it
was not written for is skipped with a warning, or refuses to start when the code is wrong
without it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from avperception_assets import patches
from avperception_assets.patches import imports, versions

from .conftest import fake_distribution

K8S_MODELS = "kubernetes.client.models.v1_pod_spec"
DEFERRED = ("lance_namespace_urllib3_client.api.table_api", K8S_MODELS, "kubernetes.config.kube_config")

# Builds a Kubernetes pod and a dagster-k8s run's Job, as a user of dagster-k8s or KubeRay
# tooling in the same process would.
USE_KUBERNETES = """
import kubernetes.client
import dagster_k8s
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job
pod = kubernetes.client.V1Pod(metadata=kubernetes.client.V1ObjectMeta(name="avp"), spec=kubernetes.client.V1PodSpec(
    containers=[kubernetes.client.V1Container(name="run", image="avp:1")]))
print(kubernetes.client.ApiClient().sanitize_for_serialization(pod)["spec"]["containers"][0]["image"])
config = DagsterK8sJobConfig(job_image="avp:2", dagster_home="/opt/dagster", instance_config_map="dagster-instance")
job = construct_dagster_k8s_job(config, ["dagster", "api", "execute_run"], "avp-run")
print(job.spec.template.spec.containers[0].image, "job_image" in dagster_k8s.K8sRunLauncher.config_type())
"""


def python(probe: str, *path: str) -> subprocess.CompletedProcess:
    """`probe` in a fresh interpreter, with `path` first on its sys.path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.fresh_interpreter
def test_importing_the_package_changes_no_other_library():
    probe = ("import sys, avperception_assets, avperception_assets.geneva_workarounds, avperception_assets.curation.columns; "
             "print([m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'lance_namespace_urllib3_client')])")
    result = python(probe)
    assert result.stdout.split() == ["[]"], result.stderr


@pytest.mark.parametrize("entry_point", ["avperception_assets", "avperception_assets.definitions"])
@pytest.mark.fresh_interpreter
def test_kubernetes_and_dagster_k8s_work_beside_the_package(entry_point):
    """Beside a plain import of the package, and in the code location's process, where the
    imports are deferred."""
    result = python(f"import {entry_point}\n{USE_KUBERNETES}")
    assert result.stdout.split() == ["avp:1", "avp:2", "True"], result.stderr


@pytest.mark.fresh_interpreter
def test_the_code_location_defers_what_it_never_calls():
    probe = f"import sys, avperception_assets.definitions, geneva.runners.ray.pipeline; print(*[m in sys.modules for m in {DEFERRED!r}])"
    result = python(probe)
    assert result.stdout.split() == ["False", "False", "False"], result.stderr


def test_ray_workers_defer_them_before_geneva_is_imported(local_ray):
    import ray

    @ray.remote(num_cpus=0)
    def deferred_after_importing_geneva() -> list[bool]:
        import geneva.runners.ray.pipeline  # noqa: F401

        return [m in sys.modules for m in DEFERRED]

    assert ray.get(deferred_after_importing_geneva.remote()) == [False, False, False]


# --- version checks ----------------------------------------------------------------------


def test_every_patch_was_written_for_the_installed_versions():
    assert [(p.name, p.mismatches()) for p in patches.PATCHES if p.mismatches()] == []


def test_a_speed_patch_on_another_version_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(fake_distribution(tmp_path, "kubernetes", "99.0.0")))
    monkeypatch.setattr(versions, "_reported", set())
    with caplog.at_level(logging.WARNING, logger=versions.__name__):
        assert not patches.kubernetes.DEFER_CLIENT.applies()
    [warning] = [r.getMessage() for r in caplog.records if r.name == versions.__name__]
    assert warning.startswith("patch kubernetes.defer_client") and "kubernetes 99.0.0 (written for 35.0.0)" in warning
    assert "not applied" in warning


def test_a_correctness_patch_on_another_version_refuses(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_distribution(tmp_path, "geneva", "99.0.0")))
    with pytest.raises(versions.PatchVersionError, match=r"patch geneva\.error_table .* geneva 99\.0\.0 \(written for 0\.17\.0\)"):
        patches.geneva.create_error_table(None)


@pytest.mark.fresh_interpreter
def test_the_code_location_starts_without_a_skipped_patch_and_imports_whole(tmp_path):
    probe = ("import sys, avperception_assets.definitions, geneva.runners.ray.pipeline; "
             f"print({K8S_MODELS!r} in sys.modules)")
    result = python(probe, str(fake_distribution(tmp_path, "kubernetes", "99.0.0")))
    assert result.returncode == 0 and result.stdout.split() == ["True"], result.stderr
    assert "patch kubernetes.defer_client" in result.stderr and "not applied" in result.stderr


@pytest.mark.fresh_interpreter
def test_the_code_location_fails_to_start_on_a_geneva_its_patches_were_not_written_for(tmp_path):
    result = python("import avperception_assets.definitions", str(fake_distribution(tmp_path, "geneva", "99.0.0")))
    assert result.returncode != 0 and "PatchVersionError: patches met versions" in result.stderr, result.stderr
    for patch in patches.geneva.PATCHES:
        outcome = "refused" if patch.correctness else "not applied"
        assert f"patch {patch.name} (avperception_assets/patches/geneva.py) found geneva 99.0.0 (written for 0.17.0): " \
               f"{outcome}" in result.stderr, patch.name


# --- the import-time mechanism ------------------------------------------------------------


def test_a_patch_waits_for_its_module_and_applies_once(tmp_path, monkeypatch):
    (tmp_path / "late_module.py").write_text("value = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    imports.patch_on_import("late_module", seen.append)
    imports.patch_on_import("late_module", seen.append)  # a second setup of one worker
    assert not seen
    import late_module

    assert seen == [late_module] and late_module.__loader__.get_source("late_module") == "value = 1\n"
    imports.patch_on_import("late_module", lambda module: seen.append("now"))
    assert seen == [late_module, "now"]
    del sys.modules["late_module"]
