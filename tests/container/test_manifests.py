"""deploy/: the Kubernetes manifests against the Kubernetes API schemas (kubernetes-validate, offline), the
compose file against the Compose specification's schema, and what the schemas cannot see: references
between objects, the restricted pod security profile, settings names against service/settings.py, and the
KEDA trigger against the Redis stream and consumer group the code uses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from worldserve.queue.redis_common import group_name, requests_key
from worldserve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "deploy" / "compose.yaml"
PROMETHEUS = ROOT / "deploy" / "monitoring" / "prometheus.yml"
OLDEST_K8S = "1.29.0"  # oldest Kubernetes the manifests must apply to
WORKLOADS = {"Deployment", "StatefulSet"}


def k8s_docs() -> list[dict]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def check_setting_names(names: list[str]) -> None:
    """Every WORLDSERVE_A__B variable names a field of Settings (a typo would be silently ignored)."""
    for name in names:
        if not name.startswith("WORLDSERVE_"):
            continue
        model: type[BaseModel] = Settings
        parts = name.removeprefix("WORLDSERVE_").lower().split("__")
        for i, part in enumerate(parts):
            assert part in model.model_fields, f"{name}: {model.__name__} has no field {part!r}"
            if i < len(parts) - 1:
                model = model.model_fields[part].annotation
                assert isinstance(model, type) and issubclass(model, BaseModel), f"{name}: {part} is no section"


def check_setting_values(env: dict[str, str], monkeypatch) -> Settings:
    """The literal values parse as settings (types, ranges, enums)."""
    with monkeypatch.context() as m:
        for k, v in env.items():
            if k.startswith("WORLDSERVE_"):
                m.setenv(k, str(v))
        return Settings()


# ---------------------------------------------------------------------------------------------- kubernetes
def test_kustomization_lists_every_manifest() -> None:
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")
    assert k["namespace"] == "worldserve"
    assert all("newTag" not in i for i in k.get("images", [])), "one tag for both would put the api on the gpu image"
    assert all(d["metadata"].get("namespace", "worldserve") == "worldserve" for d in k8s_docs())


@pytest.mark.parametrize("version", [OLDEST_K8S, kubernetes_validate.latest_version()])
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    docs = [d for d in k8s_docs() if not d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet",
                                         "PodDisruptionBudget"}
    for d in docs:
        kubernetes_validate.validate(d, version, strict=True)  # raises with the offending path


def test_pods_meet_the_restricted_security_profile() -> None:
    docs = k8s_docs()
    ns = one(docs, "Namespace", "worldserve")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        name, pod = w["metadata"]["name"], w["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False, name
            assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in sc["capabilities"], name
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be a writable emptyDir"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{name}/{c['name']}: no {probe}"
                port = c[probe].get("httpGet", {}).get("port")
                if port is not None:
                    assert port in {p["name"] for p in c["ports"]}, f"{name}: {probe} names no container port"
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name


def test_worldserve_pods_run_the_image_as_built() -> None:
    docs = k8s_docs()
    api = one(docs, "Deployment", "worldserve-api")["spec"]
    worker = one(docs, "Deployment", "worldserve-worker")["spec"]
    cmds = set()
    for spec, image, port in ((api, "worldserve:cpu", 8000), (worker, "worldserve:gpu", 8001)):
        pod = spec["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"] == image
        cmds.add(c["args"][0])
        assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["fsGroup"] == 10001
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["WORLDSERVE_SERVER__HTTP_PORT"] == str(port) and {p["containerPort"] for p in c["ports"]} >= {port}
        annotations = spec["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(port)
        # the kubelet waits for the drain: preStop + the server's grace period fit in the pod's
        pre_stop = int(c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["", "0"])[1])
        assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["WORLDSERVE_SERVER__GRACE_S"])
    assert cmds == {"api", "worker"}
    wc = worker["template"]["spec"]["containers"][0]
    assert wc["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {m["mountPath"] for m in wc["volumeMounts"]} >= {"/tmp", "/app/artifacts"}
    assert "replicas" not in worker, "the worker's replicas belong to KEDA"
    assert api["replicas"] >= 2 and api["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_cli_commands_used_by_the_deployments_exist() -> None:
    for cmd in ("api", "worker", "serve"):
        p = subprocess.run([sys.executable, "-m", "worldserve.cli.main", cmd, "--help"], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr


def test_references_between_objects_resolve(monkeypatch) -> None:
    docs = k8s_docs()
    workloads = [d for d in docs if d["kind"] in WORKLOADS]

    def pods_matching(selector: dict) -> list[str]:
        return [w["metadata"]["name"] for w in workloads
                if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]

    for w in workloads:
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
    by_name = {w["metadata"]["name"]: w for w in workloads}
    for s in find(docs, "Service"):
        (target,) = pods_matching(s["spec"]["selector"])
        ports = {p["name"] for c in by_name[target]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in s["spec"]["ports"]} <= ports, s["metadata"]["name"]
    for pdb in find(docs, "PodDisruptionBudget"):
        assert len(pods_matching(pdb["spec"]["selector"]["matchLabels"])) == 1, pdb["metadata"]["name"]
    secrets = {d["metadata"]["name"]: d["stringData"] for d in find(docs, "Secret")}
    configmaps = {d["metadata"]["name"]: d["data"] for d in find(docs, "ConfigMap")}
    for w in workloads:
        for c in w["spec"]["template"]["spec"]["containers"]:
            env = {}
            for src in c.get("envFrom", []):
                env.update(configmaps[src["configMapRef"]["name"]])
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    env[e["name"]] = secrets[ref["name"]][ref["key"]]
                elif "value" in e:
                    env[e["name"]] = e["value"]
                else:
                    assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
                    env[e["name"]] = "pod-0"
            check_setting_names(list(env))
            if c["name"] != "redis":
                s = check_setting_values(env, monkeypatch)
                assert s.queue.url.startswith("redis://") and s.queue.password is not None
                assert s.model.dir == Path("/app/models/tiny") and s.server.host == "0.0.0.0"
    # the Secret's URL names the in-cluster Redis Service
    svc = one(docs, "Service", "redis")
    assert secrets["worldserve-redis"]["url"].startswith(
        f"redis://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:"
        f"{svc['spec']['ports'][0]['port']}/")


def test_keda_scales_workers_on_the_stream_the_code_uses() -> None:
    docs = k8s_docs()
    so = one(docs, "ScaledObject", "worldserve-worker")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    ref = so["spec"]["scaleTargetRef"]
    assert ref["kind"] == "Deployment" and one(docs, "Deployment", ref["name"])
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    pending, length = so["spec"]["triggers"]
    # in service: the consumer group's pending entries; outstanding (served + waiting): the stream's length
    assert pending["metadata"]["consumerGroup"] == group_name("tiny") == "workers:tiny"
    assert int(pending["metadata"]["pendingEntriesCount"]) > 0 and "streamLength" not in pending["metadata"]
    assert int(length["metadata"]["streamLength"]) > 0 and "pendingEntriesCount" not in length["metadata"]
    svc = one(docs, "Service", "redis")
    secrets = {d["metadata"]["name"]: d["stringData"] for d in find(docs, "Secret")}
    for trigger in (pending, length):
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
        assert meta["stream"] == requests_key("tiny") == "worldserve:requests:tiny"
        assert meta["address"] == (f"redis.{svc['metadata']['namespace']}.svc.cluster.local:"
                                   f"{svc['spec']['ports'][0]['port']}")
        auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        for t in auth["spec"]["secretTargetRef"]:
            assert t["parameter"] == "password" and t["key"] in secrets[t["name"]]


# ---------------------------------------------------------------------------------------------- compose
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_validates_against_the_compose_spec() -> None:
    ref = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(ref.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(compose())


def test_compose_services(monkeypatch) -> None:
    svc = compose()["services"]
    assert set(svc) == {"redis", "api", "worker", "worker-gpu", "prometheus"}
    redis = svc["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"] and "--requirepass" in redis["command"]
    assert "redis-data:/data" in redis["volumes"]
    for name in ("redis", "api", "worker", "worker-gpu"):
        assert svc[name]["healthcheck"]["test"], name
    for name in ("api", "worker", "worker-gpu"):
        s = svc[name]
        assert s["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert s["read_only"] is True and s["cap_drop"] == ["ALL"] and s["security_opt"], name
        assert s["command"][0] in {"api", "worker"}, name
        env = s["environment"]
        check_setting_names(list(env))
        literal = {k: v for k, v in env.items() if "${" not in str(v)}
        literal["WORLDSERVE_QUEUE__PASSWORD"] = "pw"
        settings = check_setting_values(literal, monkeypatch)
        assert settings.queue.url == "redis://redis:6379/0"
        port = str(8000 if name == "api" else 8001)
        assert env["WORLDSERVE_SERVER__HTTP_PORT"] == port and f":{port}/readyz" in " ".join(s["healthcheck"]["test"])
    assert "profiles" not in svc["worker"] and svc["worker-gpu"]["profiles"] == ["gpu"]
    (device,) = svc["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert svc["worker-gpu"]["environment"]["WORLDSERVE_MODEL__DEVICE"] == "cuda"
    assert svc["worker-gpu"]["build"]["target"] == "gpu" and svc["worker"]["build"]["target"] == "cpu"
    assert "./monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in svc["prometheus"]["volumes"]


def _compose_defaults(env: dict) -> dict[str, str]:
    """Compose's ${NAME:-default} substitutions resolved to their defaults (what runs with no .env)."""
    return {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def test_gpu_workers_serve_the_fast_default(monkeypatch) -> None:
    """issue 21: the GPU workers (compose and k8s) serve bf16 on CUDA, never the slow fp32 default of old."""
    env = _compose_defaults(compose()["services"]["worker-gpu"]["environment"])
    env["WORLDSERVE_QUEUE__PASSWORD"] = "pw"
    s = check_setting_values(env, monkeypatch)
    assert (s.model.device, s.model.precision) == ("cuda", "bf16")
    (worker,) = [d for d in find(k8s_docs(), "Deployment") if "gpu" in d["spec"]["template"]["spec"]["containers"][0]
                 ["image"]]
    k8s_env = {e["name"]: e["value"] for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]
               if "value" in e}
    s = check_setting_values(k8s_env, monkeypatch)
    assert (s.model.device, s.model.precision) == ("cuda", "bf16")


def test_prometheus_scrapes_the_api_and_every_worker() -> None:
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    targets = {}
    for job in ("worldserve-api", "worldserve-worker"):
        (sd,) = jobs[job]["dns_sd_configs"]
        assert sd["type"] == "A" and jobs[job]["metrics_path"] == "/metrics"
        targets.update({n: sd["port"] for n in sd["names"]})
    assert targets == {"api": 8000, "worker": 8001, "worker-gpu": 8001}
    services = compose()["services"]
    for name, port in targets.items():
        assert services[name]["environment"]["WORLDSERVE_SERVER__HTTP_PORT"] == str(port)
