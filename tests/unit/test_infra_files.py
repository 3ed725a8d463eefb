"""The multi-node files under infra/ agree with each other and with the code they run.

Nothing here is applied (no Kubernetes, Docker daemon or second machine): each file is rendered as `envsubst`
renders it, with the defaults of infra/defaults.env, parsed, and checked against what the project reads and runs:
the `effnet` subcommands and the flows' entrypoints, the environment variables, the Ray and MLflow command lines
(parsed by their own CLIs), the ports, and the resources the v1 recipe asks for.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from pipelines.settings import DATA_DIR_ENV, PROJECT_ROOT, RAY_LOOPBACK_ENV, StackSettings

INFRA = PROJECT_ROOT / "infra"
DEFAULTS = INFRA / "defaults.env"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
RAY_UP = INFRA / "ray" / "cluster.yaml"
K8S = INFRA / "k8s"
POOL_TEMPLATE = INFRA / "prefect" / "k8s-base-job-template.json"
TEMPLATES = sorted([RAY_UP, POOL_TEMPLATE, *K8S.glob("*.yaml")])
# What envsubst replaces: $NAME and ${NAME}. `$(NAME)` is Kubernetes' expansion at run time, left alone.
PLACEHOLDER = re.compile(r"\$(?:\{(\w+)\}|([A-Za-z_]\w*))")
# Ray reads these itself; KubeRay sets them from the cluster's Secret, the flow runs from the same Secret.
RAY_AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


@cache
def defaults() -> dict[str, str]:
    """infra/defaults.env's variables with their defaults, as a shell sourcing it sees them (nothing set before)."""
    out = subprocess.run(["bash", "-c", f". {shlex.quote(str(DEFAULTS))} && env -0"], env={"PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    names = re.findall(r"^export (\w+)=", DEFAULTS.read_text(), re.M)
    return {name: env[name] for name in names}


def render(path: Path) -> str:
    return PLACEHOLDER.sub(lambda m: defaults()[m[1] or m[2]], path.read_text())


@cache
def documents(path: Path) -> tuple[Any, ...]:
    text = render(path)
    return (json.loads(text),) if path.suffix == ".json" else tuple(d for d in yaml.safe_load_all(text) if d)


def k8s_object(kind: str) -> dict[str, Any]:
    found = [d for p in K8S.glob("*.yaml") for d in documents(p) if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} under {K8S}"
    return found[0]


def containers(obj: Any) -> Iterator[dict[str, Any]]:
    """Every container of a Kubernetes object, however deep (RayJob > rayClusterSpec > groups > pod template)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "containers":
                yield from value
            else:
                yield from containers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from containers(value)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def pool_template() -> dict[str, Any]:
    return documents(POOL_TEMPLATE)[0]


def pool_defaults() -> dict[str, Any]:
    return {k: v["default"] for k, v in pool_template()["variables"]["properties"].items() if "default" in v}


def pool_job() -> dict[str, Any]:
    """The Prefect job manifest with the work pool's defaults filled in, as the worker fills them."""
    from prefect.utilities.templating import apply_values

    return apply_values(pool_template()["job_configuration"], pool_defaults())


def pool_container() -> dict[str, Any]:
    (container,) = pool_job()["job_manifest"]["spec"]["template"]["spec"]["containers"]
    return container


def ray_containers() -> list[dict[str, Any]]:
    return list(containers(k8s_object("RayCluster"))) + list(containers(k8s_object("RayJob")))


def project_env_names() -> set[str]:
    """The variables the project's settings read (DataLayout, the stack's client settings)."""
    source = (PROJECT_ROOT / "pipelines" / "settings.py").read_text()
    read = set(re.findall(r"os\.environ(?:\.get\(|\[)\"(\w+)\"", source))
    stack = StackSettings(prefect_api_url="", mlflow_tracking_uri="", ray_address="", ray_dashboard_url="")
    return read | {DATA_DIR_ENV} | set(stack.environment())


def effnet_script() -> tuple[str, str]:
    """(module, function) of the `effnet` script in pyproject.toml (read as text: no tomllib in Python 3.10)."""
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    scripts = re.search(r"^\[project\.scripts\]\n(.*?)(?:\n\[|\Z)", pyproject, re.M | re.S)[1]
    return re.search(r'^effnet = "([\w.]+):(\w+)"$', scripts, re.M).groups()


def ray_start_params(command: str) -> dict[str, Any]:
    """A `ray start ...` command line parsed by Ray's own CLI (an unknown or malformed option raises)."""
    from ray.scripts.scripts import start

    argv = shlex.split(command)
    assert argv[:2] == ["ray", "start"], command
    return start.make_context("start", argv[2:]).params


def host_port(address: str) -> tuple[str, int]:
    host, port = address.split("://")[-1].split("/")[0].rsplit(":", 1)
    return host, int(port)


# ---------------------------------------------------------------------------------------------------------------


def test_every_placeholder_has_a_default_and_every_default_is_used():
    used = set()
    for path in TEMPLATES:
        names = {a or b for a, b in PLACEHOLDER.findall(path.read_text())}
        assert names <= defaults().keys(), f"{path}: no default for {sorted(names - defaults().keys())}"
        used |= names
    readme = (INFRA / "README.md").read_text()
    unused = [n for n in defaults() if n not in used and n not in readme]
    assert not unused, f"infra/defaults.env sets what no file uses: {unused}"


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="envsubst (gettext-base) is not installed")
@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: str(p.relative_to(INFRA)))
def test_envsubst_renders_as_the_tests_do(path):
    env = {"PATH": os.environ["PATH"], **defaults()}
    out = subprocess.run(["envsubst"], input=path.read_text(), env=env, capture_output=True, text=True, check=True)
    assert out.stdout == render(path)


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: str(p.relative_to(INFRA)))
def test_files_parse_after_rendering(path):
    docs = documents(path)
    assert docs
    if path.parent == K8S:
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == defaults()["EFFNET_NAMESPACE"], doc["metadata"]


def test_every_piece_runs_the_one_image():
    image = defaults()["EFFNET_IMAGE"]
    for path in TEMPLATES:
        assert "${EFFNET_IMAGE}" in path.read_text() or path.name == "base.yaml", f"{path}: not the image variable"
    k8s = [c for p in K8S.glob("*.yaml") for d in documents(p) for c in containers(d)]
    assert k8s and {c["image"] for c in k8s} == {image}
    assert pool_container()["image"] == image
    assert documents(RAY_UP)[0]["docker"]["image"] == image


def test_dockerfile_installs_the_project_as_the_makefile_does():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    from packaging.specifiers import SpecifierSet

    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    assert "3.11" in SpecifierSet(re.search(r'^requires-python = "([^"]+)"$', pyproject, re.M)[1])
    # torch first, at the Makefile's version, which constraints.txt pins too.
    makefile_torch = re.search(r"^TORCH_VERSION := (\S+)$", (PROJECT_ROOT / "Makefile").read_text(), re.M)[1]
    constraints = (PROJECT_ROOT / "constraints.txt").read_text()
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)[1] == makefile_torch
    assert f"\ntorch=={makefile_torch}\n" in constraints
    runs = re.findall(r"^RUN (.*?)(?<!\\)$", text, re.M | re.S)
    torch_at, project_at = (next(i for i, r in enumerate(runs) if key in r)
                            for key in ('"torch==${TORCH_VERSION}"', "-c constraints.txt"))
    assert torch_at < project_at
    # The checkout lies at the working directory: deployments name flows by path from the checkout root.
    assert re.search(r"^WORKDIR /app$", text, re.M) and re.search(r"^COPY \. \.$", text, re.M)
    assert "pip install --no-deps -e ." in text
    # `effnet` is the entry point, the script pyproject.toml declares.
    assert re.search(r'^ENTRYPOINT \["effnet"\]$', text, re.M)
    module, function = effnet_script()
    assert callable(getattr(importlib.import_module(module), function))
    env = dict(re.findall(r"(\w+)=(\S+)", "\n".join(re.findall(r"^ENV (.*)$", text, re.M))))
    assert env[DATA_DIR_ENV] == defaults()["EFFNET_DATA_DIR"]
    assert env["RAY_AUTH_MODE"] == "token"


def test_dockerignore_keeps_local_state_out_and_the_code_in():
    ignored = {line.strip() for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "data", ".git"} <= ignored
    needed = {"pyproject.toml", "constraints.txt", "README.md", "models", "pipelines", "flows"}
    assert not needed & {p.strip("/") for p in ignored}


def test_the_rayjob_runs_a_real_effnet_command():
    from flows.deployments import V1_FAMILY
    from pipelines.training.recipe import load_recipe, parse_family_member

    argv = shlex.split(k8s_object("RayJob")["spec"]["entrypoint"])
    assert argv[0] == "effnet"
    cli = importlib.import_module(effnet_script()[0])
    args = cli.build_parser().parse_args(argv[1:])  # an unknown subcommand or option exits here
    assert args.command == "family"
    for variant in args.variants:
        parse_family_member(variant)
    load_recipe(args.recipe)
    # By default the RayJob trains what the b0-b7 deployment trains.
    assert args.variants == list(V1_FAMILY)


def test_flow_runs_join_the_cluster_then_run_their_flow(tmp_path, monkeypatch):
    (command,) = pool_container()["args"]
    assert pool_container()["command"] == ["/bin/bash", "-c"]
    join, run = command.split(" && ")
    params = ray_start_params(join.replace("$(RAY_ADDRESS)", pool_defaults()["env"]["RAY_ADDRESS"]))
    assert params["num_cpus"] == 0 and params["num_gpus"] == 0 and not params["head"]
    assert run == "exec prefect flow-run execute"
    help_ = subprocess.run([str(Path(sys.executable).parent / "prefect"), "flow-run", "execute", "--help"],
                           env={**os.environ, "PREFECT_HOME": str(tmp_path)}, capture_output=True, text=True)
    assert help_.returncode == 0, help_.stderr
    # The deployments name their flows by path from the checkout root, where the image keeps the checkout.
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.chdir(PROJECT_ROOT)
    from prefect.flows import load_flow_from_entrypoint

    from flows.deployments import build_deployments

    for deployment in build_deployments():
        assert load_flow_from_entrypoint(deployment.entrypoint).name == deployment.flow_name


def test_the_prefect_template_is_a_valid_work_pool_template():
    import jsonschema
    from prefect.server.schemas.actions import WorkPoolCreate

    WorkPoolCreate(name=defaults()["EFFNET_WORK_POOL"], type="kubernetes", base_job_template=pool_template())
    jsonschema.Draft7Validator.check_schema(pool_template()["variables"])
    job = pool_job()
    assert job["namespace"] == defaults()["EFFNET_NAMESPACE"]
    spec = job["job_manifest"]["spec"]["template"]["spec"]
    # What Prefect's Kubernetes worker requires of a job manifest.
    assert (spec["parallelism"], spec["completions"], spec["restartPolicy"]) == (1, 1, "Never")
    assert spec["containers"][0]["name"] == "prefect-job"


def test_the_env_they_set_is_what_the_project_reads():
    read = project_env_names()
    assert {DATA_DIR_ENV, "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL"} <= read
    flow_env = {**pool_defaults()["env"], **env_of(pool_container())}
    assert {DATA_DIR_ENV, "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL"} <= flow_env.keys()
    for env in [flow_env, *map(env_of, ray_containers())]:
        assert env.keys() <= read | RAY_AUTH_ENV, sorted(env.keys() - read - RAY_AUTH_ENV)
        assert {DATA_DIR_ENV, "MLFLOW_TRACKING_URI", "PREFECT_API_URL"} <= env.keys()
    docker_env = dict(o.split(" ", 1)[1].split("=", 1) for o in documents(RAY_UP)[0]["docker"]["run_options"]
                      if o.startswith("-e "))
    assert {DATA_DIR_ENV, "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RAY_ADDRESS"} <= docker_env.keys() <= read
    # It makes Ray refuse every node but the head (`ray start --address` aborts): never on a cluster.
    for path in TEMPLATES:
        assert RAY_LOOPBACK_ENV not in path.read_text(), path
    # The MLflow server's database comes from the variable its CLI reads for --backend-store-uri.
    from mlflow.cli import server

    (mlflow,) = containers(k8s_object("Deployment"))
    (store,) = [p for p in server.params if p.name == "backend_store_uri"]
    assert store.envvar in env_of(mlflow)


def test_every_container_mounts_the_shared_volume_at_the_data_dir():
    data_dir = defaults()["EFFNET_DATA_DIR"]
    pvc = k8s_object("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    pods = [s for obj in (k8s_object("RayCluster"), k8s_object("RayJob")) for s in _pod_specs(obj)]
    pods.append(pool_job()["job_manifest"]["spec"]["template"]["spec"])
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims[mounts[data_dir]] == pvc["metadata"]["name"], c["name"]
            env = {**pool_defaults()["env"], **env_of(c)} if c["name"] == "prefect-job" else env_of(c)
            assert env[DATA_DIR_ENV] == data_dir
    run_options = documents(RAY_UP)[0]["docker"]["run_options"]
    assert f"-v {defaults()['EFFNET_SHARED_MOUNT']}:{data_dir}" in run_options
    assert f"-e {DATA_DIR_ENV}={data_dir}" in run_options


def _pod_specs(obj: Any) -> Iterator[dict[str, Any]]:
    if isinstance(obj, dict):
        if "containers" in obj:
            yield obj
        for value in obj.values():
            yield from _pod_specs(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _pod_specs(value)


def test_kuberay_objects_have_a_head_and_a_gpu_worker_group():
    cluster, job = k8s_object("RayCluster"), k8s_object("RayJob")
    assert (cluster["apiVersion"], job["apiVersion"]) == ("ray.io/v1", "ray.io/v1")
    constraints = (PROJECT_ROOT / "constraints.txt").read_text()
    assert f"\nray=={cluster['spec']['rayVersion']}\n" in constraints
    # One spec, two lifetimes: the RayJob's own cluster is the long-lived one's.
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    spec = cluster["spec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # drivers only: no training on the head
    (group,) = spec["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"][
        "nvidia.com/gpu"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] >= 1
    # Every rayStartParams key is an option of `ray start`, with a value it accepts.
    for params in (spec["headGroupSpec"]["rayStartParams"], group["rayStartParams"]):
        ray_start_params("ray start " + " ".join(f"--{k}={v}" for k, v in params.items()))


def test_the_gpu_group_holds_the_v1_recipe():
    from pipelines.training.cluster import unmet_request, worker_resources
    from pipelines.training.recipe import load_recipe

    spec = k8s_object("RayCluster")["spec"]
    (group,) = spec["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    limits = worker["resources"]["limits"]
    nodes = [{"CPU": 0.0}] + [{"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}] * group["replicas"]
    recipe = load_recipe("v1")
    assert unmet_request(recipe.ray.num_workers, worker_resources(recipe), nodes) is None


def test_addresses_agree_with_the_servers_they_name():
    cluster = k8s_object("RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    (head_container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    params = head["rayStartParams"]
    assert int(params["port"]) == ports["gcs-server"]
    assert int(params["dashboard-port"]) == ports["dashboard"]
    assert int(params["ray-client-server-port"]) == ports["client"]
    # KubeRay's head Service is <cluster>-head-svc; flow runs in the same namespace reach it by that name.
    assert host_port(pool_defaults()["env"]["RAY_ADDRESS"]) == (f"{cluster['metadata']['name']}-head-svc",
                                                                ports["gcs-server"])
    assert pool_job()["namespace"] == cluster["metadata"]["namespace"]
    secret = env_of(pool_container())["RAY_AUTH_TOKEN"]["secretKeyRef"]
    assert (secret["name"], secret["key"]) == (f"{cluster['metadata']['name']}-auth-secret", "auth_token")
    # Every MLFLOW_TRACKING_URI names the MLflow Service, on the port the server listens on.
    service, deployment = k8s_object("Service"), k8s_object("Deployment")
    (port,) = service["spec"]["ports"]
    (mlflow,) = containers(deployment)
    assert port["targetPort"] == mlflow["ports"][0]["name"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    from mlflow.cli import server

    listens = server.make_context("server", list(mlflow["args"])).params
    assert listens["port"] == port["port"] == mlflow["ports"][0]["containerPort"]
    uris = [pool_defaults()["env"]["MLFLOW_TRACKING_URI"],
            *(env_of(c)["MLFLOW_TRACKING_URI"] for c in ray_containers())]
    assert {host_port(u) for u in uris} == {(service["metadata"]["name"], port["port"])}
    assert listens["artifacts_destination"].startswith("s3://")


def test_ray_up_config_is_valid_for_rays_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = documents(RAY_UP)[0]
    validate_config(prepare_config(dict(config)))  # what `ray up` does first
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) == config["min_workers"] == config["max_workers"]
    (head_start,) = [c for c in config["head_start_ray_commands"] if c.startswith("ray start")]
    (worker_start,) = [c for c in config["worker_start_ray_commands"] if c.startswith("ray start")]
    head, worker = ray_start_params(head_start), ray_start_params(worker_start)
    assert head["head"] and head["num_cpus"] == 0 and head["num_gpus"] == 0
    assert host_port(worker["address"]) == (config["provider"]["head_ip"], head["port"])
    # Drivers on the head (`effnet serve`) join the same head.
    (ray_address,) = [o.split("=", 1)[1] for o in config["docker"]["run_options"] if o.startswith("-e RAY_ADDRESS=")]
    assert host_port(ray_address) == (config["provider"]["head_ip"], head["port"])
