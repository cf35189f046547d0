"""The deployment recipe (Dockerfile, deploy/): the Kubernetes manifests are valid objects for pinned
Kubernetes versions and keep the invariants their sizing rests on (exclusive cores for the workers,
a /dev/shm large enough, probes and ports that match the server's arguments, a drain that ends before
the kubelet kills); Envoy balances over the headless Service; the Dockerfile installs sgserve with
scripts/setup.sh's commands. Files only: no cluster, no docker, no network.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sgserve.config import ServerConfig
from sgserve.models.tfs_config import parse_model_server_config
from sgserve.settings import README_BEGIN
from tests.conftest import import_required

dockerfile = import_required("dockerfile")
kubernetes_validate = import_required("kubernetes_validate")
yaml = import_required("yaml")

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
# The oldest minor version the manifests promise to work on, and the newest one the pinned
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Cores beyond the workers' own: the broker, the gRPC/REST front door and the loader share one.
EXTRA_CORES = 1
UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
         "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 10**-3}


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every object in every YAML file under deploy/kubernetes, with its file."""
    found = []
    for path in sorted(KUBERNETES_DIR.rglob("*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [doc for doc in objects(kind) if doc["metadata"]["name"] == name]
    return found


def deployments_by_file() -> dict[str, dict[str, Any]]:
    return {str(path.relative_to(KUBERNETES_DIR)): doc for path, doc in manifests() if doc["kind"] == "Deployment"}


@pytest.fixture(params=sorted(deployments_by_file()))
def deployment(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each Deployment: the /dev/shm one and the file tier's."""
    return deployments_by_file()[request.param]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def flags(args: list[str]) -> dict[str, str]:
    """`--name=value` arguments by name; TF Serving's underscores and sgserve's dashes alike."""
    out = {}
    for arg in args:
        assert re.fullmatch(r"--[a-z_-]+=\S+", arg), f"write arguments as --name=value: {arg!r}"
        name, value = arg[2:].split("=", 1)
        out[name.replace("_", "-")] = value
    return out


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity ("5", "500m", "4Gi") as a number of cores or bytes."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * UNITS[unit]


def container_port(c: dict[str, Any], port: str | int) -> int:
    """A probe's or Service's port (a name or a number) as the container's port number."""
    by_name = {p["name"]: p["containerPort"] for p in c["ports"]}
    return by_name[port] if isinstance(port, str) else port


def volume_at(deployment: dict[str, Any], mount_path: str) -> dict[str, Any]:
    [mount] = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == mount_path]
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    return volume


def config_file(deployment: dict[str, Any], path: str) -> str:
    """The text of a file the container reads from its ConfigMap mount."""
    directory, key = path.rsplit("/", 1)
    configmap = volume_at(deployment, directory)["configMap"]["name"]
    return one("ConfigMap", configmap)["data"][key]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_pinned_kubernetes_versions(version: str) -> None:
    found = manifests()
    for path, doc in found:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']} is not "
                                 f"valid for Kubernetes {version}: {exc.message} at {list(exc.path)}") from None
    kinds = sorted(doc["kind"] for _, doc in found)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "PersistentVolumeClaim", "PodDisruptionBudget",
                     "Service", "Service"]


def test_guaranteed_qos_gives_the_workers_whole_cores(deployment: dict[str, Any]) -> None:
    c = container(deployment)
    resources, args = c["resources"], flags(c["args"])
    assert resources["requests"] == resources["limits"], "Guaranteed QoS needs requests == limits"
    assert set(resources["limits"]) == {"cpu", "memory"}
    cpu = resources["limits"]["cpu"]
    assert isinstance(cpu, str) and cpu.isdigit(), f"the static CPU manager needs a whole cpu count, got {cpu!r}"
    assert int(cpu) == int(args["workers"]) * int(args["cpus-per-worker"]) + EXTRA_CORES


def test_dev_shm_is_a_sized_memory_emptydir_inside_the_memory_limit(deployment: dict[str, Any]) -> None:
    empty_dir = volume_at(deployment, "/dev/shm")["emptyDir"]
    assert empty_dir["medium"] == "Memory"
    limit = quantity(container(deployment)["resources"]["limits"]["memory"])
    assert 64 * 2**20 < quantity(empty_dir["sizeLimit"]) < limit


def test_the_file_tier_puts_segments_on_their_own_volume() -> None:
    [tiered] = [doc for doc in objects("Deployment") if "segment-dir" in flags(container(doc)["args"])]
    segment_dir = flags(container(tiered)["args"])["segment-dir"]
    claim = volume_at(tiered, segment_dir)["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"]
    assert quantity(claim["resources"]["requests"]["storage"]) > quantity(
        container(tiered)["resources"]["limits"]["memory"]), "the file tier is for models larger than memory"


def test_probes_ask_the_rest_port_for_liveness_and_model_status(deployment: dict[str, Any]) -> None:
    c = container(deployment)
    args = flags(c["args"])
    models = parse_model_server_config(config_file(deployment, args["model-config-file"]))
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for get in probes.values():
        assert container_port(c, get["port"]) == int(args["rest-api-port"])
    assert probes["startupProbe"]["path"] == probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] in {f"/v1/models/{m.name}" for m in models}
    [models_mount] = [m for m in c["volumeMounts"] if m["name"] == "models"]
    assert all(m.base_path.startswith(models_mount["mountPath"] + "/") for m in models)
    assert {p["containerPort"] for p in c["ports"]} == {
        int(args["port"]), int(args["rest-api-port"]), int(args["endpoint"].rsplit(":", 1)[1])}


def test_the_grace_period_outlasts_the_drain(deployment: dict[str, Any]) -> None:
    c = container(deployment)
    drain = float(flags(c["args"]).get("drain-timeout", ServerConfig.drain_timeout))
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(command[1]) + drain


def test_pdb_and_services_select_the_deployments_pods(deployment: dict[str, Any]) -> None:
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [pdb] = objects("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    c = container(deployment)
    for service in objects("Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert container_port(c, port["targetPort"]) == port["port"]
    assert one("Service", "sgserve-headless")["spec"]["clusterIP"] == "None"


def test_prometheus_scrapes_the_monitoring_path(deployment: dict[str, Any]) -> None:
    # TF Serving's MonitoringConfig proto is not in the tensorflow-serving-api wheel: read its two fields.
    args = flags(container(deployment)["args"])
    config = config_file(deployment, args["monitoring-config-file"])
    assert re.search(r"\bprometheus_config\s*\{[^}]*\benable:\s*true\b", config)
    path = re.search(r'\bprometheus_config\s*\{[^}]*\bpath:\s*"([^"]+)"', config).group(1)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": args["rest-api-port"],
                           "prometheus.io/path": path}


def test_the_configmaps_monitoring_config_is_the_images() -> None:
    image_file = (ROOT / "deploy" / "docker" / "monitoring.config").read_text()
    assert one("ConfigMap", "sgserve-config")["data"]["monitoring.config"] == image_file


def test_envoy_balances_grpc_per_request_over_the_headless_service() -> None:
    envoy = yaml.safe_load((ROOT / "deploy" / "envoy" / "envoy.yaml").read_text())
    [cluster] = envoy["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["lb_policy"] in ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")
    [options] = cluster["typed_extension_protocol_options"].values()
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    [[endpoint]] = [group["lb_endpoints"] for group in cluster["load_assignment"]["endpoints"]]
    address = endpoint["endpoint"]["address"]["socket_address"]
    headless = one("Service", "sgserve-headless")
    namespace = headless["metadata"].get("namespace", "default")
    assert address["address"] == f"{headless['metadata']['name']}.{namespace}.svc.cluster.local"
    [grpc] = [p for p in headless["spec"]["ports"] if p["name"] == "grpc"]
    grpc_arg = flags(container(deployments_by_file()["deployment.yaml"])["args"])["port"]
    assert address["port_value"] == grpc["port"] == int(grpc_arg)
    [listener] = envoy["static_resources"]["listeners"]
    [[manager]] = [chain["filters"] for chain in listener["filter_chains"]]
    [host] = manager["typed_config"]["route_config"]["virtual_hosts"]
    assert {route["route"]["cluster"] for route in host["routes"]} == {cluster["name"]}


PIP_QUIET = {"-q", "--quiet", "--no-cache-dir"}


def install_steps(script: str) -> tuple[list[list[str]], list[str]]:
    """A shell script's `pip install`s (their arguments, without -q and redirections) and the Python
    snippets it runs with `-c`, in order: what must agree between setup.sh and the Dockerfile."""
    text = re.sub(r"^\s*#.*\n", "", script, flags=re.M)
    installs = []
    for line in text.splitlines():
        if "-m pip install" in line:
            words = shlex.split(re.split(r">|\|\|", line.split("-m pip install", 1)[1])[0])
            installs.append([w for w in words if w not in PIP_QUIET])
    return installs, re.findall(r"-c '(.*?)'", text, flags=re.S)


def for_the_image(words: list[str]) -> list[str]:
    """setup.sh's install as the image runs it: not editable, and without the [test] extra."""
    out = []
    for word in words:
        extras = re.fullmatch(r"\.\[(.*)\]", word)
        if extras:
            word = ".[" + ",".join(e for e in extras.group(1).split(",") if e != "test") + "]"
        if word != "-e":
            out.append(word)
    return out


def docker_instructions() -> list[Any]:
    return list(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def docker_run_script() -> str:
    """The build's RUN instructions, heredocs included, as one script."""
    parts = []
    for ins in docker_instructions():
        if ins.cmd == "RUN":
            parts += [h.content for h in ins.heredocs] or [" ".join(ins.value)]
    return "\n".join(parts)


def test_the_dockerfile_installs_with_setup_shs_commands() -> None:
    setup_installs, setup_snippets = install_steps((ROOT / "scripts" / "setup.sh").read_text())
    script = docker_run_script()
    checked = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, f"the Dockerfile's RUN script is not valid sh: {checked.stderr}"
    image_installs, image_snippets = install_steps(script)
    assert any("--no-deps" in words for words in setup_installs), "setup.sh installs [serving-apis] with --no-deps"
    assert image_installs == [for_the_image(words) for words in setup_installs]
    assert image_snippets == setup_snippets, "the [serving-apis] requirements and the import check, as setup.sh"
    readme = (ROOT / "README.md").read_text()
    spans = [shlex.split(span.split("pip install", 1)[1]) for span in re.findall(r"`([^`]*pip install[^`]*)`", readme)]
    [main_install] = [words for words in setup_installs if any(w.startswith(".[") for w in words)]
    assert main_install in spans, f"README.md names setup.sh's install, pip install {shlex.join(main_install)}"
    assert "--no-deps" in readme


def test_the_image_runs_sgserve_start_as_a_non_root_user() -> None:
    by_cmd: dict[str, list[Any]] = {}
    for ins in docker_instructions():
        by_cmd.setdefault(ins.cmd, []).append(ins)
    assert all(re.fullmatch(r"python:3\.1[0-9]-slim", ins.value[0]) for ins in by_cmd["FROM"])
    [user] = by_cmd["USER"]
    uid = int(user.value[0].split(":")[0])
    assert uid != 0
    assert {doc["spec"]["template"]["spec"]["securityContext"]["runAsUser"] for doc in objects("Deployment")} == {uid}
    [entrypoint], [cmd] = by_cmd["ENTRYPOINT"], by_cmd["CMD"]
    [exposed], [health] = by_cmd["EXPOSE"], by_cmd["HEALTHCHECK"]
    assert entrypoint.json and list(entrypoint.value) == ["sgserve", "start"]
    args = flags(list(cmd.value))
    ports = {int(args["port"]), int(args["rest-api-port"]), int(args["endpoint"].rsplit(":", 1)[1])}
    assert {int(p) for p in exposed.value} == ports
    assert re.search(r"http://127\.0\.0\.1:(\d+)/healthz", " ".join(health.value)).group(1) == args["rest-api-port"]
    copied = {ins.value[-1]: ins.value[0] for ins in by_cmd["COPY"]}
    assert copied[args["monitoring-config-file"]] == "deploy/docker/monitoring.config"


def test_the_readme_says_how_to_deploy() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Deploying\n" in readme and readme.index("\n## Deploying\n") < readme.index(README_BEGIN)
    section = readme.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]
    tag = re.search(r"docker build -t (\S+) \.", section).group(1)
    assert {container(doc)["image"].split(":")[0] for doc in objects("Deployment")} == {tag.split(":")[0]}
    assert "kubectl apply -f deploy/kubernetes/" in section
    assert "--shm-size" in section and "/dev/shm" in section
