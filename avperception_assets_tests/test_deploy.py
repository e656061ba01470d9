"""`deploy/` on paper, checked by code (no chart can be fetched and no cluster reached here): the
Helm values give a K8s run launcher config that dagster-k8s accepts, dagster-k8s resolves beside
the kubernetes client Geneva pins, every manifest uses only fields its API type has, and the files
agree with each other and with the code location (one image, the settings the workspace reads,
the Ray head's service)."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from avperception_assets.workspace import VARIABLES, Workspace

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = ("settings.yaml", "secrets.template.yaml", "raycluster.yaml")
RELEASE = "dagster"  # the Helm release name deploy/README.md installs
BUCKET_SECRET = "avp-bucket"
BUCKET_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
BUCKET_SETTINGS = {"AWS_ENDPOINT_URL", "AWS_REGION"}

# The Dagster chart's top-level values and a code location's (its values schema), and how its instance template writes
# `runLauncher.config.k8sRunLauncher` into the K8sRunLauncher's config
# (templates/helpers/instance/_run-launcher.tpl of dagster/dagster).
CHART_VALUES = {"dagsterWebserver", "dagster-user-deployments", "postgresql", "generatePostgresqlPasswordSecret",
                "generateCeleryConfigSecret", "rabbitmq", "redis", "flower", "ingress", "imagePullSecrets",
                "computeLogManager", "scheduler", "runLauncher", "pythonLogs", "dagsterDaemon", "busybox", "migrate",
                "telemetry", "serviceAccount", "global", "retention", "concurrency", "additionalInstanceConfig"}
USER_DEPLOYMENT = {"name", "image", "port", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns",
                   "env", "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity", "tolerations",
                   "podSecurityContext", "securityContext", "resources", "livenessProbe", "readinessProbe",
                   "startupProbe", "labels", "volumeMounts", "volumes", "schedulerName", "initContainers",
                   "sidecarContainers"}
LAUNCHER_FIELDS = {"loadInclusterConfig": "load_incluster_config", "kubeconfigFile": "kubeconfig_file",
                   "jobNamespace": "job_namespace", "imagePullPolicy": "image_pull_policy", "envVars": "env_vars",
                   "volumeMounts": "volume_mounts", "volumes": "volumes", "labels": "labels",
                   "resources": "resources", "failPodOnRunFailure": "fail_pod_on_run_failure",
                   "schedulerName": "scheduler_name", "securityContext": "security_context"}
LAUNCHER_ENV_SOURCES = {"envConfigMaps": "env_config_maps", "envSecrets": "env_secrets"}
RUN_K8S_CONFIG_FIELDS = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
                         "podTemplateSpecMetadata": "pod_template_spec_metadata",
                         "jobSpecConfig": "job_spec_config", "jobMetadata": "job_metadata"}

# KubeRay's ray.io/v1 RayCluster fields around its pod templates (the CRD's schema).
RAYCLUSTER_SPEC = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"template", "rayStartParams", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "template", "rayStartParams", "replicas", "minReplicas", "maxReplicas",
                "idleTimeoutSeconds", "scaleStrategy", "numOfHosts", "suspend"}
# The head's port for each form of AVP_RAY_ADDRESS: Ray Client, or a driver on a node of the cluster.
HEAD_PORT_OF_SCHEME = {"ray": "client", "": "gcs-server"}


# --- reading deploy/ ---------------------------------------------------------------------------


def manifests() -> dict[tuple[str, str], dict]:
    """{(kind, name): document} of every Kubernetes manifest in deploy/."""
    documents = [doc for name in MANIFESTS for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}


def only(kind: str) -> dict:
    (document,) = [doc for (k, _), doc in manifests().items() if k == kind]
    return document


def helm_values() -> dict:
    return yaml.safe_load((DEPLOY / "dagster-values.yaml").read_text())


def code_location(values: dict) -> dict:
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return deployment


def names(sources: list[dict]) -> set[str]:
    return {source["name"] for source in sources}


def launcher_config(values: dict) -> dict:
    """The K8sRunLauncher config the chart writes into the instance from these values (release
    `dagster` in the namespace of the manifests); a key the chart does not know raises."""
    chart = values["runLauncher"]["config"]["k8sRunLauncher"]
    config = {"job_namespace": only("ConfigMap")["metadata"]["namespace"],
              "dagster_home": values["global"]["dagsterHome"],
              "instance_config_map": f"{RELEASE}-instance",
              "postgres_password_secret": values["global"]["postgresqlSecretName"],
              "service_account_name": RELEASE}
    for key, value in chart.items():
        if key in LAUNCHER_ENV_SOURCES:
            config[LAUNCHER_ENV_SOURCES[key]] = [source["name"] for source in value]
        elif key == "image":
            config["job_image"] = f"{value['repository']}:{value['tag']}"
        elif key == "runK8sConfig":
            config["run_k8s_config"] = {RUN_K8S_CONFIG_FIELDS[k]: v for k, v in value.items()}
        else:
            config[LAUNCHER_FIELDS[key]] = value
    return config


def run_job(values: dict, kubeconfig: Path, tags: dict[str, str] | None = None):
    """The Kubernetes Job the run launcher these values configure builds for a run of the code
    location, as its `launch_run` does, short of sending it (a kubeconfig pointing nowhere stands in
    for the in-cluster config)."""
    import dagster_k8s
    from dagster._config import process_config
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster_k8s.job import construct_dagster_k8s_job

    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "here",
        "clusters": [{"name": "here", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "contexts": [{"name": "here", "context": {"cluster": "here", "user": "here"}}],
        "users": [{"name": "here", "user": {"token": "none"}}]}))
    config = {**launcher_config(values), "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    launcher = dagster_k8s.K8sRunLauncher.from_config_value(
        None, process_config(dagster_k8s.K8sRunLauncher.config_type(), config).value)
    context = launcher.get_container_context_for_run(DagsterRun(job_name="__ASSET_JOB", run_id="r1", tags=tags or {}))
    image = code_location(values)["image"]
    job_config = context.get_k8s_job_config(job_image=f"{image['repository']}:{image['tag']}", run_launcher=launcher)
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_run"], "dagster-run-r1",
                                     user_defined_k8s_config=context.run_k8s_config)


def unknown_fields(data, api_type: str, path: str = "") -> list[str]:
    """Paths in `data` that the Kubernetes API type `api_type` (as the kubernetes client's models
    name them: `V1PodSpec`, `list[V1Container]`, `dict(str, str)`) has no field for."""
    import kubernetes.client.models

    if api_type.startswith("list["):
        return [p for i, item in enumerate(data) for p in unknown_fields(item, api_type[5:-1], f"{path}[{i}]")]
    if api_type.startswith("dict("):
        value_type = api_type[5:-1].split(", ", 1)[1]
        return [p for key, item in data.items() for p in unknown_fields(item, value_type, f"{path}.{key}")]
    model = getattr(kubernetes.client.models, api_type, None)
    if model is None:  # str, int, bool, object
        return []
    if not isinstance(data, dict):
        return [f"{path} (not an object)"]
    fields = {json_key: model.openapi_types[attribute] for attribute, json_key in model.attribute_map.items()}
    return [p for key, item in data.items()
            for p in ([f"{path}.{key}"] if key not in fields else unknown_fields(item, fields[key], f"{path}.{key}"))]


def pod_templates(raycluster: dict) -> list[dict]:
    spec = raycluster["spec"]
    return [spec["headGroupSpec"]["template"], *(group["template"] for group in spec["workerGroupSpecs"])]


def containers(raycluster: dict) -> list[dict]:
    return [container for template in pod_templates(raycluster) for container in template["spec"]["containers"]]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- the run launcher --------------------------------------------------------------------------


def test_the_helm_values_give_a_run_launcher_config_dagster_k8s_accepts():
    import dagster_k8s
    from dagster._config import process_config

    values = helm_values()
    assert set(values) <= CHART_VALUES, f"not values of the Dagster chart: {set(values) - CHART_VALUES}"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    config = launcher_config(values)
    result = process_config(dagster_k8s.K8sRunLauncher.config_type(), config)
    assert result.success, [error.message for error in result.errors]
    assert set(config["env_config_maps"]) == {name for kind, name in manifests() if kind == "ConfigMap"}
    assert set(config["env_secrets"]) == {BUCKET_SECRET}
    assert unknown_fields(config["resources"], "V1ResourceRequirements") == []


def test_a_run_pod_gets_the_image_the_settings_the_bucket_and_postgres(tmp_path):
    values = helm_values()
    job = run_job(values, tmp_path / "kubeconfig")
    (container,) = job.spec.template.spec.containers
    image = code_location(values)["image"]
    assert container.image == f"{image['repository']}:{image['tag']}"
    assert [(s.config_map_ref and s.config_map_ref.name, s.secret_ref and s.secret_ref.name)
            for s in container.env_from] == [(only("ConfigMap")["metadata"]["name"], None), (None, BUCKET_SECRET)]
    (password,) = [env.value_from.secret_key_ref for env in container.env if env.name == "DAGSTER_PG_PASSWORD"]
    assert password.key in manifests()[("Secret", password.name)]["stringData"]
    assert container.resources.requests == values["runLauncher"]["config"]["k8sRunLauncher"]["resources"]["requests"]
    # it joins the RayCluster before the run (the image's entrypoint), so its runs can be Ray drivers
    assert any(env.name == "AVP_JOIN_RAY" and env.value == "1" for env in container.env)
    entrypoint = (DEPLOY / "entrypoint.sh").read_text()
    assert 'ray start --address="$AVP_RAY_ADDRESS" --num-cpus=0' in entrypoint and 'exec "$@"' in entrypoint
    assert 'ENTRYPOINT ["/usr/local/bin/avp-entrypoint"]' in (DEPLOY / "Dockerfile").read_text()


def test_a_training_jobs_tag_adds_a_gpu_to_the_run_pod(tmp_path):
    """deploy/README.md's way to give training runs a GPU."""
    gpu = {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}
    values = helm_values()
    job = run_job(values, tmp_path / "kubeconfig", {"dagster-k8s/config": json.dumps(gpu)})
    (container,) = job.spec.template.spec.containers
    launcher_resources = values["runLauncher"]["config"]["k8sRunLauncher"]["resources"]
    assert container.resources.limits == {**launcher_resources["limits"], "nvidia.com/gpu": "1"}
    assert container.resources.requests == launcher_resources["requests"]


@pytest.mark.parametrize("mistake", [
    {"resources": {"requests": "4"}},  # a string where the chart wants a mapping
    {"failPodOnRunFailure": "yes"},
])
def test_a_wrong_run_launcher_value_is_refused(mistake):
    import dagster_k8s
    from dagster._config import process_config

    values = helm_values()
    values["runLauncher"]["config"]["k8sRunLauncher"].update(mistake)
    assert not process_config(dagster_k8s.K8sRunLauncher.config_type(), launcher_config(values)).success


def test_a_run_launcher_key_the_chart_does_not_know_is_refused():
    values = helm_values()
    values["runLauncher"]["config"]["k8sRunLauncher"]["jobNamepsace"] = "avp"
    with pytest.raises(KeyError, match="jobNamepsace"):
        launcher_config(values)


def test_dagster_k8s_resolves_beside_the_installed_kubernetes_and_dagster():
    """dagster-k8s's requirements hold for what Geneva pulled in, it imports in a process where
    the kubernetes patch deferred the client (conftest applies it), and the image's `k8s` extra pins
    the dagster-k8s tested here and dagster-postgres of the same release."""
    import dagster_k8s
    from kubernetes import client

    for requirement in map(Requirement, metadata.requires("dagster-k8s")):
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            installed = metadata.version(requirement.name)
            assert requirement.specifier.contains(installed, prereleases=True), f"{requirement} vs {installed}"
    assert Requirement(next(r for r in metadata.requires("geneva") if r.startswith("kubernetes"))).specifier.contains(
        metadata.version("kubernetes"))
    assert dagster_k8s.K8sRunLauncher.__module__.startswith("dagster_k8s") and client.V1Job.__name__ == "V1Job"
    extra = {r.name: r.specifier for r in map(Requirement, pyproject()["project"]["optional-dependencies"]["k8s"])}
    assert set(extra) == {"dagster-k8s", "dagster-postgres"}
    assert extra["dagster-k8s"] == extra["dagster-postgres"] == SpecifierSet(f"=={metadata.version('dagster-k8s')}")


# --- the manifests ---------------------------------------------------------------------------------


def test_every_manifest_uses_only_fields_its_api_type_has():
    found = manifests()
    assert {kind for kind, _ in found} == {"ConfigMap", "Secret", "RayCluster"}
    for (kind, name), document in found.items():
        if kind == "RayCluster":
            assert document["apiVersion"] == "ray.io/v1"
            spec = document["spec"]
            assert set(spec) <= RAYCLUSTER_SPEC and set(spec["headGroupSpec"]) <= HEAD_GROUP
            assert all(set(group) <= WORKER_GROUP for group in spec["workerGroupSpecs"])
            for template in pod_templates(document):
                assert unknown_fields(template, "V1PodTemplateSpec") == [], name
        else:
            assert document["apiVersion"] == "v1"
            assert unknown_fields(document, f"V1{kind}") == [], name
    location = code_location(helm_values())
    assert set(location) <= USER_DEPLOYMENT, f"not fields of a code location: {set(location) - USER_DEPLOYMENT}"
    assert unknown_fields(location["resources"], "V1ResourceRequirements") == []


def test_a_misspelled_pod_field_is_found():
    raycluster = only("RayCluster")
    raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envFom"] = []
    assert unknown_fields(pod_templates(raycluster)[0], "V1PodTemplateSpec") == [".spec.containers[0].envFom"]


def test_one_image_runs_the_code_location_its_runs_and_the_ray_nodes():
    values = helm_values()
    location = code_location(values)
    image = location["image"]
    images = {f"{image['repository']}:{image['tag']}", *(c["image"] for c in containers(only("RayCluster")))}
    built = re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", (DEPLOY / "README.md").read_text())
    assert len(images | set(built)) == 1 and built, (images, built)
    assert location["dagsterApiGrpcArgs"] == ["-m", pyproject()["tool"]["dagster"]["module_name"]]
    assert location["includeConfigInLaunchedRuns"]["enabled"]  # the settings reach the run pods


def test_the_image_installs_this_project_with_the_deployment_extra_and_matching_versions():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M).group(1)
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(f"{python}.0")
    assert re.search(r"pip install '\.\[k8s\]'", dockerfile)
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        assert all((ROOT / path).exists() for path in source.split()), source
    # Ray's client and cluster must run one Ray version; the chart must be the pinned dagster's.
    assert only("RayCluster")["spec"]["rayVersion"] == metadata.version("ray")
    chart = re.search(r"helm install \S+ dagster/dagster --version (\S+)", (DEPLOY / "README.md").read_text())
    assert chart.group(1) == metadata.version("dagster")


# --- settings, secrets and the Ray head --------------------------------------------------------------


def test_the_settings_are_variables_the_workspace_reads():
    settings = only("ConfigMap")["data"]
    known = {variable.name for variable in VARIABLES}
    assert {name for name in settings if name.startswith("AVP_")} <= known
    workspace = Workspace.from_env(settings)
    assert workspace.data_location.startswith("s3://") and workspace.ray_address
    assert not workspace.dead_run_check  # runs execute in pods of their own
    assert BUCKET_SETTINGS <= set(settings)


def test_every_pod_that_runs_the_code_gets_the_settings_and_the_bucket():
    settings, bucket = only("ConfigMap")["metadata"]["name"], BUCKET_SECRET
    location = code_location(helm_values())
    assert (names(location["envConfigMaps"]), names(location["envSecrets"])) == ({settings}, {bucket})
    for container in containers(only("RayCluster")):
        sources = container["envFrom"]
        assert {s["configMapRef"]["name"] for s in sources if "configMapRef" in s} == {settings}
        assert {s["secretRef"]["name"] for s in sources if "secretRef" in s} == {bucket}


def test_the_secrets_are_templates_of_what_the_deployment_reads():
    found = manifests()
    values = helm_values()
    bucket = found[("Secret", BUCKET_SECRET)]["stringData"]
    postgres = found[("Secret", values["global"]["postgresqlSecretName"])]["stringData"]
    assert set(bucket) == BUCKET_CREDENTIALS
    placeholders = [*bucket.values(), *postgres.values()]
    assert all(re.fullmatch(r"<[^<>]+>", value) for value in placeholders), "real credentials in a template"
    assert not values["generatePostgresqlPasswordSecret"] and not values["postgresql"]["enabled"]
    assert values["postgresql"]["postgresqlHost"]


def test_the_ray_address_is_the_rayclusters_head_service():
    from geneva.utils.ray import GENEVA_RAY_HEAD

    raycluster = only("RayCluster")
    name, namespace = raycluster["metadata"]["name"], raycluster["metadata"]["namespace"]
    address = Workspace.from_env(only("ConfigMap")["data"]).ray_address
    parts = urlsplit(address if "://" in address else f"//{address}")
    service = f"{name}-head-svc"  # the head Service KubeRay creates for a RayCluster
    assert parts.hostname in {service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
                              f"{service}.{namespace}.svc.cluster.local"}, address
    head = raycluster["spec"]["headGroupSpec"]
    (container,) = head["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert parts.port == ports[HEAD_PORT_OF_SCHEME[parts.scheme]], address
    # Geneva's pipeline drivers pin to the head by this resource; the head itself runs no tasks.
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert GENEVA_RAY_HEAD in json.loads(json.loads(head["rayStartParams"]["resources"]))
    assert {doc["metadata"]["namespace"] for doc in manifests().values()} == {namespace}


def test_the_cluster_instance_keeps_the_local_instances_limits():
    """The chart's instance keeps ../dagster.yaml's pools (one training and one table write at a
    time), run limit, retries and telemetry."""
    local = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    values = helm_values()
    concurrency = values["concurrency"]
    assert concurrency["enabled"]
    assert concurrency["pools"]["defaultLimit"] == local["concurrency"]["pools"]["default_limit"]
    assert concurrency["runs"]["maxConcurrentRuns"] == local["concurrency"]["runs"]["max_concurrent_runs"]
    assert values["additionalInstanceConfig"]["run_retries"] == local["run_retries"]
    assert not values["dagsterDaemon"]["runRetries"]["enabled"]  # else the chart writes run_retries twice
    assert values["telemetry"]["enabled"] == local["telemetry"]["enabled"]
