"""The Helm chart helm/jrs, rendered and linted offline (helm-python-sdk embeds Helm), the
manifests validated against the Kubernetes schemas (kubernetes-validate, strict) and yamllint."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import CHART_DIR, DOCKER_DIR, DOCKERFILES
from tests.deploy.test_docker import SERVE_PORT, parse_dockerfile

RELEASE = "demo"
NAMESPACE = "radiotherapy"
KUBE_VERSIONS = ("1.29.0", "1.33.0")  # the chart's kubeVersion floor and a recent release
Manifests = dict[str, list[dict[str, Any]]]

INGRESS_HPA_EXISTING_SECRET: dict[str, Any] = {
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": "2g"},
        "hosts": [{"host": "jrs.hospital.example", "paths": [{"path": "/", "pathType": "Prefix"}]}],
        "tls": [{"secretName": "jrs-tls", "hosts": ["jrs.hospital.example"]}],
    },
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5},
    "persistence": {"enabled": False},
    "service": {"sessionAffinity": "ClientIP"},
    "apiKeys": {"existingSecret": "hospital-jrs-keys", "secretKey": "keys.txt"},
}
BATCH: dict[str, Any] = {
    "batchJob": {"enabled": True, "completions": 6, "parallelism": 3, "nameSuffix": "2024w23"}
}
GPU: dict[str, Any] = {"gpu": {"enabled": True, "count": 2, "runtimeClassName": "nvidia"}}
ADAPT_SERVICE: dict[str, Any] = {"adaptation": {"enabled": True}}
ADAPT_WORKER: dict[str, Any] = {
    "adaptation": {"enabled": True, "mode": "worker", "extraArgs": ["--fractions", "8"]}
}
#: a site synonym table (docs/tps-guide.md): names YAML must quote, a landmark, prefer_automatic
SITE_SYNONYMS: dict[str, Any] = {
    "prostate": ["CTVp", "Prost MR: site"],
    "seminal_vesicles": ["SV_prox"],
    "bladder": ["Blase_voll", "no", "1.10"],
    "femoral_head_left": ["HueftkopfLi"],
    "prefer_automatic": True,
}
SYNONYMS: dict[str, Any] = {"synonyms": {"table": SITE_SYNONYMS}}
SYNONYMS_MOUNTED = "/etc/jrs/synonyms/synonyms.yaml"
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu": GPU,
    "ingress-hpa-existing-secret": INGRESS_HPA_EXISTING_SECRET,
    "batch": BATCH,
    "batch-gpu": {**BATCH, **GPU},
    "adaptation-service": ADAPT_SERVICE,
    "adaptation-worker-gpu": {**ADAPT_WORKER, **GPU},
    "synonyms-batch-adaptation-worker": {**SYNONYMS, **BATCH, **ADAPT_WORKER},
}


@pytest.fixture(scope="module")
def helm() -> Any:
    """The helm_python module with its native library loaded; skips when unavailable."""
    module = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    try:
        module.helm_sdk_version()
    except Exception as exc:  # the wheel's native library cannot load on this platform
        pytest.skip(f"helm-python-sdk cannot load libhelm_c: {exc}")
    return module


@pytest.fixture(scope="module")
def chart(helm: Any) -> Any:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def render(chart: Any) -> Callable[[dict[str, Any]], Manifests]:
    def run(values: dict[str, Any]) -> Manifests:
        out: dict[str, str] = chart.render(
            copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True
        )
        docs: Manifests = {}
        for path, text in out.items():
            if not path.endswith(".yaml"):
                continue
            docs[Path(path).name] = [d for d in yaml.safe_load_all(text) if d]
        return docs

    return run


def _one(docs: Manifests, kind: str) -> dict[str, Any]:
    found = [d for ds in docs.values() for d in ds if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _kinds(docs: Manifests) -> list[str]:
    return sorted(d["kind"] for ds in docs.values() for d in ds)


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_passes(helm: Any, scenario: str) -> None:
    for kube in KUBE_VERSIONS:
        report = helm.lint(
            CHART_DIR, copy.deepcopy(SCENARIOS[scenario]), strict=True, kube_version=f"v{kube}"
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_manifests_are_valid_kubernetes(
    render: Callable[[dict[str, Any]], Manifests], scenario: str
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(SCENARIOS[scenario])
    for name, items in docs.items():
        for doc in items:
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except Exception as exc:
                    pytest.fail(f"{scenario}: {name} ({doc['kind']}) invalid for {version}: {exc}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_manifests_pass_yamllint(chart: Any, scenario: str) -> None:
    pytest.importorskip("yamllint")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(
        "{extends: default, rules: {document-start: disable, line-length: {max: 120},"
        " indentation: {indent-sequences: whatever}, comments: {min-spaces-from-content: 1}}}"
    )
    out: dict[str, str] = chart.render(
        copy.deepcopy(SCENARIOS[scenario]), name=RELEASE, namespace=NAMESPACE
    )
    for path, text in out.items():
        if not path.endswith(".yaml") or not text.strip():
            continue
        problems = list(linter.run(text.strip() + "\n", config))
        assert not problems, f"{path}: {[str(p) for p in problems]}"


def test_chart_files_pass_yamllint() -> None:
    pytest.importorskip("yamllint")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(
        "{extends: default, rules: {document-start: disable, line-length: {max: 110}}}"
    )
    for name in ("Chart.yaml", "values.yaml"):
        problems = list(linter.run((CHART_DIR / name).read_text(), config))
        assert not problems, f"{name}: {[str(p) for p in problems]}"


def test_default_render(render: Callable[[dict[str, Any]], Manifests]) -> None:
    docs = render({})
    assert _kinds(docs) == [
        "Deployment",
        "PersistentVolumeClaim",
        "Pod",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert "nvidia.com/gpu" not in json.dumps(deployment)
    assert "runtimeClassName" not in pod and "tolerations" not in pod
    assert container["image"] == "jrs:0.1.0-cpu"
    assert container["args"] == ["serve", "--host", "0.0.0.0", "--port", str(SERVE_PORT)]
    assert container["ports"] == [{"name": "http", "containerPort": SERVE_PORT, "protocol": "TCP"}]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["replicas"] == 1

    env = _env(container)
    assert env["JRS_DEVICE"] == "cpu"
    assert env["JRS_ENGINE"] == "auto" and env["JRS_PRECISION"] == "auto"
    assert env["JRS_DATA_DIR"] == "/var/lib/jrs"
    assert env["JRS_API_KEYS_FILE"] == "/etc/jrs/api-keys/api-keys"
    assert "JRS_MODEL_DIR" not in env, "the image's bundled model by default"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["api-keys"]["mountPath"] == "/etc/jrs/api-keys" and mounts["api-keys"]["readOnly"]
    assert mounts["data"]["mountPath"] == "/var/lib/jrs"
    assert mounts["tmp"]["mountPath"] == "/tmp"
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = _one(docs, "Secret")
    assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert secret["data"]["api-keys"], "a key is generated when none is given"
    pvc = _one(docs, "PersistentVolumeClaim")
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]

    test_pod = _one(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = test_pod["spec"]["containers"][0]["command"][2]
    assert f"http://{RELEASE}-jrs:{SERVE_PORT}" in script and "/health/ready" in script
    compile(script, "test-connection", "exec")


def test_chart_agrees_with_the_image() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert DOCKER_DIR / "Dockerfile.adapt-cpu" in DOCKERFILES
    for path in DOCKERFILES:
        final = parse_dockerfile(path).stages[-1]
        assert final.all("EXPOSE") == [str(values["containerPort"])]
        uid = final.all("USER")[-1].split(":")[0]
        assert str(values["podSecurityContext"]["runAsUser"]) == uid
        assert str(values["securityContext"]["runAsUser"]) == uid
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    pyproject = (CHART_DIR.parents[1] / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in pyproject


def test_gpu_only_when_enabled(render: Callable[[dict[str, Any]], Manifests]) -> None:
    docs = render(GPU)
    deployment = _one(docs, "Deployment")
    container = _container(deployment)
    pod = deployment["spec"]["template"]["spec"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["memory"] == "16Gi", "other limits are kept"
    assert container["image"] == "jrs:0.1.0-gpu"
    assert _env(container)["JRS_DEVICE"] == "cuda"
    assert _env(container)["JRS_ENGINE"] == "auto"  # ONNX Runtime on CUDA
    assert pod["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    scheduled = render(
        {
            "gpu": {"enabled": True, "nodeSelector": {"nvidia.com/gpu.present": "true"}},
            "nodeSelector": {"topology.kubernetes.io/zone": "a"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "rt"}],
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "image": {"flavour": "gpu", "tag": "0.1.0-gpu-hospital"},
        }
    )
    pod = _one(scheduled, "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {
        "nvidia.com/gpu.present": "true",
        "topology.kubernetes.io/zone": "a",
    }
    assert [t["key"] for t in pod["tolerations"]] == ["dedicated", "nvidia.com/gpu"]
    assert "nodeAffinity" in pod["affinity"]
    assert pod["containers"][0]["image"] == "jrs:0.1.0-gpu-hospital"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    # without the GPU: no GPU limit anywhere, even with the batch job
    for values in ({}, BATCH):
        assert "nvidia.com/gpu" not in json.dumps(render(values))


def test_ingress_hpa_existing_secret(render: Callable[[dict[str, Any]], Manifests]) -> None:
    docs = render(INGRESS_HPA_EXISTING_SECRET)
    kinds = _kinds(docs)
    assert "Secret" not in kinds, "an existing Secret is used, none is created"
    assert "PersistentVolumeClaim" not in kinds
    deployment = _one(docs, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert "strategy" not in deployment["spec"]
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "hospital-jrs-keys"
    assert volumes["api-keys"]["secret"]["items"] == [{"key": "keys.txt", "path": "keys.txt"}]
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert _env(_container(deployment))["JRS_API_KEYS_FILE"] == "/etc/jrs/api-keys/keys.txt"

    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    ingress = _one(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["jrs.hospital.example"], "secretName": "jrs-tls"}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = _one(docs, "Service")
    assert backend == {"name": service["metadata"]["name"], "port": {"number": SERVE_PORT}}
    assert service["spec"]["sessionAffinity"] == "ClientIP"


def test_shared_data_volume_with_several_replicas_is_refused(chart: Any, helm: Any) -> None:
    for values in ({"replicaCount": 2}, {"autoscaling": {"enabled": True}}):
        with pytest.raises(helm.HelmError, match="must never share the data volume"):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmError, match="batchJob needs a volume shared"):
        chart.render(
            {"batchJob": {"enabled": True}, "persistence": {"enabled": False}},
            name=RELEASE,
            namespace=NAMESPACE,
        )


def test_batch_job_shards_the_manifest(render: Callable[[dict[str, Any]], Manifests]) -> None:
    docs = render(BATCH)
    job = _one(docs, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"]) == (6, 3)
    assert job["metadata"]["name"] == f"{RELEASE}-jrs-batch-2024w23"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    container = _container(job)
    args = container["args"]
    assert args[0] == "batch"
    assert args[args.index("--shard-index") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert args[args.index("--shard-count") + 1] == "6"
    assert args[args.index("--manifest") + 1] == "/data/batch/manifest.csv"
    env = _env(container)
    assert env["JOB_COMPLETION_INDEX"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    claim = spec["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == _one(docs, "PersistentVolumeClaim")["metadata"]["name"]

    # the Service never routes to batch (or test) pods
    selector = _one(docs, "Service")["spec"]["selector"]
    batch_labels = spec["template"]["metadata"]["labels"]
    api_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(api_labels.get(k) == v for k, v in selector.items())
    assert not all(batch_labels.get(k) == v for k, v in selector.items())
    test_labels = _one(docs, "Pod")["metadata"]["labels"]
    assert not all(test_labels.get(k) == v for k, v in selector.items())

    per_index = render(
        {"batchJob": {"enabled": True, "backoffLimitPerIndex": 1, "claimName": "rt-batch-rwx"}}
    )
    job_spec = _one(per_index, "Job")["spec"]
    assert job_spec["backoffLimitPerIndex"] == 1 and "backoffLimit" not in job_spec
    assert job_spec["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "rt-batch-rwx"
    }


def test_batch_job_arguments_parse_with_the_real_cli(
    render: Callable[[dict[str, Any]], Manifests],
) -> None:
    """The Job's arguments are accepted by `jrs batch` (nothing is run)."""
    typer_main = pytest.importorskip("typer.main")
    from jrs.cli.main import app

    command = typer_main.get_command(app)
    values = {
        "batchJob": {**BATCH["batchJob"], "retryFailed": True, "extraArgs": ["--dvf-spacing", "2"]}
    }
    args = _container(_one(render(values), "Job"))["args"]
    for index in (0, 5):
        argv = [a.replace("$(JOB_COMPLETION_INDEX)", str(index)) for a in args]
        ctx = command.make_context("jrs", list(argv))
        sub = command.get_command(ctx, argv[0])
        assert sub is not None
        sub_ctx = sub.make_context(argv[0], argv[1:], parent=ctx)
        assert sub_ctx.params["shard_index"] == index
        assert sub_ctx.params["shard_count"] == 6
        assert sub_ctx.params["retry_failed"] is True
        assert sub_ctx.params["dvf_spacing"] == 2.0
        assert str(sub_ctx.params["out"]) == "/data/batch/out"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "two"}, "replicaCount"),
        ({"image": {"tag": "latest"}}, "tag"),
        ({"gpu": {"enabled": "yes"}}, "enabled"),
        ({"gpu": {"count": 0}}, "count"),
        ({"service": {"port": 70000}}, "port"),
        ({"batchJob": {"completions": 0}}, "completions"),
        ({"batchJob": {"method": "magic"}}, "method"),
        ({"config": {"MAX_JOBS": "2"}}, "MAX_JOBS"),
        ({"device": "tpu"}, "device"),
        ({"engine": "tensorflow"}, "engine"),
        ({"precision": "int4"}, "precision"),
        ({"replicas": 2}, "replicas"),
    ],
)
def test_schema_rejects_bad_values(
    chart: Any, helm: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError) as caught:
        chart.validate_schema(chart.merge_values(values))
    assert message in str(caught.value)
    with pytest.raises(helm.HelmError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_accepts_every_scenario(chart: Any) -> None:
    for values in SCENARIOS.values():
        chart.validate_schema(chart.merge_values(copy.deepcopy(values)))


def test_notes_explain_keys_and_batch(chart: Any) -> None:
    notes = chart.render({**BATCH}, name=RELEASE, namespace=NAMESPACE)["jrs/templates/NOTES.txt"]
    assert f"get secret {RELEASE}-jrs-api-keys" in notes
    assert f"helm test {RELEASE}" in notes
    assert "batch_status.shard-<i>-of-<n>.csv" in notes
    plain = chart.render({"ingress": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE)[
        "jrs/templates/NOTES.txt"
    ]
    assert "http://jrs.example.org/" in plain and "no TLS section" in plain


# ----------------------------------------------------------------- patient-specific adaptation
ADAPT_ENV = ("JRS_ADAPTATION", "JRS_ADAPT_MINUTES", "JRS_ADAPT_ARGS", "JRS_ADAPT_BASE_DIR")


def _workloads(docs: Manifests) -> dict[str, dict[str, Any]]:
    """Deployments, Jobs and Pods by their component label."""
    found = {}
    for ds in docs.values():
        for doc in ds:
            if doc["kind"] in ("Deployment", "Job", "Pod"):
                found[doc["metadata"]["labels"]["app.kubernetes.io/component"]] = doc
    return found


def _pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]
    return spec if workload["kind"] == "Pod" else spec["template"]["spec"]


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    meta = (
        workload["metadata"]
        if workload["kind"] == "Pod"
        else workload["spec"]["template"]["metadata"]
    )
    labels: dict[str, str] = meta["labels"]
    return labels


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions In) selects labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _data_claim(pod: dict[str, Any], container: dict[str, Any]) -> tuple[str, str]:
    """(claim name, mount path) of the data volume of a pod."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (name,) = claims
    return claims[name], mounts[name]


def test_adaptation_absent_when_disabled(render: Callable[[dict[str, Any]], Manifests]) -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["adaptation"]["enabled"] is False, "adaptation is opt-in"
    for scenario in ("default", "gpu", "batch", "ingress-hpa-existing-secret"):
        docs = render(SCENARIOS[scenario])
        workloads = _workloads(docs)
        assert "adaptation" not in workloads, scenario
        text = json.dumps(docs)
        assert "adapt-cpu" not in text and "jrs.service.patients" not in text, scenario
        assert "podAffinity" not in text, scenario
        for workload in workloads.values():
            pod = _pod_spec(workload)
            for container in pod["containers"]:
                names = {e["name"] for e in container.get("env", [])}
                assert not names & {*ADAPT_ENV, "JRS_PATIENT_RETENTION_DAYS"}, scenario
        api = workloads["api"]
        assert (
            _pod_spec(api)["terminationGracePeriodSeconds"]
            == values["terminationGracePeriodSeconds"]
        )
        assert _container(api)["resources"]["requests"] == values["resources"]["requests"]
    # extra adaptation values change nothing while it is off
    off = {"adaptation": {"enabled": False, "mode": "worker", "minutes": 5}}
    assert _kinds(render(off)) == _kinds(render({}))
    assert _one(render(off), "Deployment") == _one(render({}), "Deployment")


def test_adaptation_in_the_service_pod(render: Callable[[dict[str, Any]], Manifests]) -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    ada = values["adaptation"]
    assert ada["mode"] == "service"
    docs = render(ADAPT_SERVICE)
    workloads = _workloads(docs)
    assert sorted(workloads) == ["api", "test"], "no worker: the service adapts itself"
    api = workloads["api"]
    container = _container(api)
    pod = _pod_spec(api)
    assert container["image"] == "jrs:0.1.0-adapt-cpu"
    assert container["args"][0] == "serve"
    env = _env(container)
    assert env["JRS_ADAPTATION"] == "local", "required: an error in the log where it cannot train"
    assert env["JRS_ADAPT_MINUTES"] == "15"
    assert env["JRS_ADAPT_ARGS"] == "--threads 4"
    assert env["JRS_PATIENT_RETENTION_DAYS"] == "30"
    assert env["JRS_DEVICE"] == "cpu"
    assert "JRS_ADAPT_BASE_DIR" not in env, "the served model by default"
    # the patient store lives in JRS_DATA_DIR, on the chart's persistent claim (kept on uninstall)
    claim, mount = _data_claim(pod, container)
    assert env["JRS_DATA_DIR"] == mount == "/var/lib/jrs"
    pvc = _one(docs, "PersistentVolumeClaim")
    assert claim == pvc["metadata"]["name"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert api["spec"]["strategy"] == {"type": "Recreate"}, "one process on the store at a time"
    # resources for a re-contouring job and a fine-tuning at once
    resources = container["resources"]
    assert resources == ada["serviceResources"]
    assert (
        int(resources["requests"]["cpu"]) - int(values["resources"]["requests"]["cpu"])
        >= ada["threads"]
    )
    assert resources["limits"]["memory"] == "28Gi" and resources["requests"]["memory"] == "16Gi"
    # a stopping pod lets `jrs adapt` checkpoint (the service gives it JRS_SHUTDOWN_GRACE_S)
    grace = pod["terminationGracePeriodSeconds"]
    assert grace == 120 and grace > float(values["config"]["JRS_SHUTDOWN_GRACE_S"]) + 30
    assert "affinity" not in pod, "one pod: nothing to keep together"
    # helm test runs the image the service runs (the CPU image need not be pushed)
    assert _pod_spec(workloads["test"])["containers"][0]["image"] == "jrs:0.1.0-adapt-cpu"

    custom = render(
        {
            "image": {"repository": "registry.example/jrs"},
            "adaptation": {
                "enabled": True,
                "minutes": 18,
                "threads": None,
                "baseDir": "/models/crossstitch/3",
                "patientRetentionDays": 7.5,
                "extraArgs": ["--fractions", "8", "--base-weights", "/weights/my ckpt.pt"],
            },
        }
    )
    container = _container(_workloads(custom)["api"])
    env = _env(container)
    assert container["image"] == "registry.example/jrs:0.1.0-adapt-cpu"
    assert env["JRS_ADAPT_MINUTES"] == "18" and env["JRS_PATIENT_RETENTION_DAYS"] == "7.5"
    assert env["JRS_ADAPT_BASE_DIR"] == "/models/crossstitch/3"
    assert env["JRS_ADAPT_ARGS"] == "--fractions 8 --base-weights '/weights/my ckpt.pt'"
    digest = "sha256:" + "ab" * 32
    pinned = render(
        {"adaptation": {"enabled": True, "image": {"repository": "r/jrs-adapt", "digest": digest}}}
    )
    assert _container(_workloads(pinned)["api"])["image"] == f"r/jrs-adapt@{digest}"


def test_adaptation_worker_beside_a_gpu_service(
    render: Callable[[dict[str, Any]], Manifests],
) -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    docs = render(SCENARIOS["adaptation-worker-gpu"])
    workloads = _workloads(docs)
    assert sorted(workloads) == ["adaptation", "api", "test"]
    api, worker = workloads["api"], workloads["adaptation"]
    assert worker["kind"] == "Deployment"
    assert worker["metadata"]["name"] == f"{RELEASE}-jrs-adaptation"
    assert worker["spec"]["replicas"] == 1, "one worker per data folder"
    assert worker["spec"]["strategy"] == {"type": "Recreate"}

    # the service keeps its GPU image and leaves the adaptation to the worker
    api_container = _container(api)
    api_env = _env(api_container)
    assert api_container["image"] == "jrs:0.1.0-gpu"
    assert api_env["JRS_ADAPTATION"] == "external" and api_env["JRS_DEVICE"] == "cuda"
    assert api_container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert api_container["resources"]["requests"] == values["resources"]["requests"]

    # the worker: adapt-cpu image, `python -m jrs.service.patients`, on the CPU, no GPU
    container = _container(worker)
    pod = _pod_spec(worker)
    assert container["image"] == "jrs:0.1.0-adapt-cpu"
    assert container["command"] == ["python", "-m", "jrs.service.patients"]
    assert "args" not in container and "ports" not in container
    env = _env(container)
    assert env["JRS_DEVICE"] == "cpu"
    assert env["JRS_ADAPTATION"] == "external"
    assert env["JRS_ADAPT_MINUTES"] == "15"
    assert env["JRS_ADAPT_ARGS"] == "--threads 4 --fractions 8"
    assert "JRS_API_KEYS_FILE" not in env, "the worker serves nothing"
    assert "nvidia.com/gpu" not in json.dumps(container), "no GPU request or limit"
    assert "runtimeClassName" not in pod
    resources = container["resources"]
    assert resources == values["adaptation"]["worker"]["resources"]
    assert int(resources["requests"]["cpu"]) >= values["adaptation"]["threads"]
    assert resources["limits"]["memory"] == "12Gi"
    # same patient store: the same claim at the same JRS_DATA_DIR as the service
    assert _data_claim(pod, container) == _data_claim(_pod_spec(api), api_container)
    assert env["JRS_DATA_DIR"] == api_env["JRS_DATA_DIR"]
    assert _data_claim(pod, container)[0] == _one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    # the worker checkpoints on SIGTERM (up to STOP_GRACE_S = 60 s) before the kill
    assert pod["terminationGracePeriodSeconds"] >= 90
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    # it may run on the (tainted) GPU node of the service
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]

    # service and worker share a node (WAL-mode SQLite, a ReadWriteOnce claim), whichever starts
    # first: each one's required pod affinity selects the other and itself
    for one in (api, worker):
        (term,) = _pod_spec(one)["affinity"]["podAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        for other in (api, worker):
            assert _selects(term["labelSelector"], _pod_labels(other))
        for stranger in (workloads["test"],):
            assert not _selects(term["labelSelector"], _pod_labels(stranger))
    assert not _selects(
        _pod_spec(api)["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            0
        ]["labelSelector"],
        {**_pod_labels(api), "app.kubernetes.io/instance": "another-release"},
    )
    # the Service never routes to the worker
    selector = _one(docs, "Service")["spec"]["selector"]
    assert not all(_pod_labels(worker).get(k) == v for k, v in selector.items())

    # a user's affinity is kept, the co-location term is added to it
    user: dict[str, Any] = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    kept = render({**ADAPT_WORKER, "affinity": user})
    for one in _workloads(kept).values():
        if one["kind"] == "Deployment":
            affinity = _pod_spec(one)["affinity"]
            assert "nodeAffinity" in affinity and "podAffinity" in affinity


def test_adaptation_settings_parse_with_the_service_and_the_cli(
    render: Callable[[dict[str, Any]], Manifests], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The worker's environment is valid service settings, and the `jrs adapt` command the worker
    builds from it is accepted by the real command line (nothing is run)."""
    typer_main = pytest.importorskip("typer.main")
    settings_module = pytest.importorskip("jrs.service.settings")
    patients = pytest.importorskip("jrs.service.patients")
    from jrs.cli.main import app

    for scenario in ("adaptation-service", "adaptation-worker-gpu"):
        workloads = _workloads(render(SCENARIOS[scenario]))
        container = _container(workloads["adaptation" if "worker" in scenario else "api"])
        monkeypatch.chdir(tmp_path)  # no .env file
        for key in [k for k in os.environ if k.startswith("JRS_")]:
            monkeypatch.delenv(key)
        for item in container["env"]:
            if "value" in item and item["name"].startswith("JRS_"):
                monkeypatch.setenv(item["name"], item["value"])
        monkeypatch.delenv("JRS_API_KEYS_FILE", raising=False)
        settings = settings_module.load_settings(insecure_dev=True)
        assert settings.adaptation == ("local" if scenario == "adaptation-service" else "external")
        assert settings.adapt_minutes == 15
        argv = patients.adapt_command(settings, Path("/var/lib/jrs/patients/p1"))
        assert argv[1:4] == ["-m", "jrs.cli", "adapt"]
        command = typer_main.get_command(app)
        ctx = command.make_context("jrs", argv[3:])
        sub = command.get_command(ctx, "adapt")
        assert sub is not None
        params = sub.make_context("adapt", argv[4:], parent=ctx).params
        assert params["threads"] == 4 and params["minutes"] == 15
        assert params["device"] == "cpu"
        assert str(params["out"]).startswith("/var/lib/jrs/patients/p1")
        if "worker" in scenario:
            assert params["fractions"] == 8


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"adaptation": {"enabled": True}, "persistence": {"enabled": False}},
            "set persistence.enabled=true",
        ),
        ({"adaptation": {"enabled": True}, "gpu": {"enabled": True}}, "set adaptation.mode=worker"),
        (
            {
                "adaptation": {"enabled": True, "mode": "worker"},
                "persistence": {"accessModes": ["ReadWriteOncePod"]},
            },
            "ReadWriteOncePod allows one",
        ),
        (
            {"adaptation": {"enabled": True}, "config": {"JRS_ADAPT_MINUTES": "20"}},
            "config.JRS_ADAPT_MINUTES conflicts",
        ),
        (
            {"adaptation": {"enabled": True, "mode": "worker"}, "replicaCount": 2},
            "must never share the data volume",
        ),
    ],
)
def test_adaptation_refuses_what_cannot_work(
    chart: Any, helm: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=message):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"adaptation": {"enabled": "yes"}}, "enabled"),
        ({"adaptation": {"mode": "cluster"}}, "mode"),
        ({"adaptation": {"image": {"tag": "latest"}}}, "tag"),
        ({"adaptation": {"minutes": 0}}, "minutes"),
        ({"adaptation": {"threads": 0}}, "threads"),
        ({"adaptation": {"extraArgs": "--fractions 8"}}, "extraArgs"),
        ({"adaptation": {"worker": {"replicas": 2}}}, "replicas"),
    ],
)
def test_schema_rejects_bad_adaptation_values(
    chart: Any, helm: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError) as caught:
        chart.validate_schema(chart.merge_values(values))
    assert message in str(caught.value)


def test_notes_explain_adaptation(chart: Any) -> None:
    for mode, logs in (
        ("service", f"deployment/{RELEASE}-jrs -f"),
        ("worker", f"deployment/{RELEASE}-jrs-adaptation"),
    ):
        notes = chart.render(
            {"adaptation": {"enabled": True, "mode": mode}}, name=RELEASE, namespace=NAMESPACE
        )["jrs/templates/NOTES.txt"]
        assert f"Patient-specific adaptation ({mode} mode, image jrs:0.1.0-adapt-cpu)" in notes
        assert logs in notes and "/var/lib/jrs/patients/<id>/adapt.log" in notes
    plain = chart.render({}, name=RELEASE, namespace=NAMESPACE)["jrs/templates/NOTES.txt"]
    assert "adaptation" not in plain.lower()


# ------------------------------------------------------------------- site synonym table (ROIs)
def _synonym_mount(workload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) of the synonym ConfigMap in a workload's pod (its only container)."""
    pod = _pod_spec(workload)
    volumes = [v for v in pod["volumes"] if "configMap" in v]
    assert len(volumes) == 1, f"one ConfigMap volume expected: {pod['volumes']}"
    (volume,) = volumes
    mounts = [m for m in _container(workload)["volumeMounts"] if m["name"] == volume["name"]]
    assert len(mounts) == 1, mounts
    return volume, mounts[0]


def _mounted_file(workload: dict[str, Any]) -> str:
    """The path the synonym file has in the pod: the mount path and the projected item path."""
    volume, mount = _synonym_mount(workload)
    (item,) = volume["configMap"]["items"]
    return f"{mount['mountPath'].rstrip('/')}/{item['path']}"


def test_synonyms_absent_when_unset(render: Callable[[dict[str, Any]], Manifests]) -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["synonyms"]["table"] == {} and values["synonyms"]["existingConfigMap"] == ""
    for scenario, scenario_values in SCENARIOS.items():
        if "synonyms" in scenario_values:
            continue
        docs = render(scenario_values)
        assert "ConfigMap" not in _kinds(docs), scenario
        text = json.dumps([d for ds in docs.values() for d in ds])  # not the template file names
        assert "JRS_SYNONYMS" not in text and "synonyms" not in text, scenario
        assert "checksum/synonyms" not in text, scenario
    # the other synonym values change nothing while no table is given
    base = {**BATCH, **ADAPT_WORKER, "apiKeys": {"keys": ["k" * 32]}}  # no random key
    idle = {"synonyms": {"key": "site.yaml", "mountPath": "/srv/rois"}}
    assert render({**idle, **base}) == render(base)


def test_synonyms_table_is_mounted_read_only_everywhere_it_is_read(
    render: Callable[[dict[str, Any]], Manifests],
) -> None:
    docs = render(SCENARIOS["synonyms-batch-adaptation-worker"])
    config_map = _one(docs, "ConfigMap")
    assert config_map["metadata"]["name"] == f"{RELEASE}-jrs-synonyms"
    assert list(config_map["data"]) == ["synonyms.yaml"]
    # the file is the given mapping, value for value (names YAML would misread stay strings)
    assert yaml.safe_load(config_map["data"]["synonyms.yaml"]) == SITE_SYNONYMS

    workloads = _workloads(docs)
    assert sorted(workloads) == ["adaptation", "api", "batch", "test"]
    checksums = set()
    for component in ("api", "adaptation", "batch"):
        workload = workloads[component]
        volume, mount = _synonym_mount(workload)
        assert volume["configMap"]["name"] == config_map["metadata"]["name"], component
        assert volume["configMap"]["items"] == [{"key": "synonyms.yaml", "path": "synonyms.yaml"}]
        assert volume["configMap"]["defaultMode"] == 0o444, component
        assert mount["readOnly"] is True, component
        assert mount["mountPath"] == "/etc/jrs/synonyms", component
        assert _mounted_file(workload) == SYNONYMS_MOUNTED
        container = _container(workload)
        env = _env(container)
        if component == "batch":  # `jrs batch` takes the file as an option, not from the env
            args = container["args"]
            assert args[args.index("--synonyms") + 1] == SYNONYMS_MOUNTED
            annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
            assert "checksum/synonyms" not in annotations, "a Job's pod template cannot change"
        else:
            assert env["JRS_SYNONYMS"] == SYNONYMS_MOUNTED, component
            assert [e["name"] for e in container["env"]].count("JRS_SYNONYMS") == 1
            checksums.add(
                workload["spec"]["template"]["metadata"]["annotations"]["checksum/synonyms"]
            )
    # the helm test pod reads no ROI
    assert "synonyms" not in json.dumps(workloads["test"])

    # a changed table rolls the service and the worker; other values leave the checksum alone
    assert len(checksums) == 1
    changed = copy.deepcopy(SCENARIOS["synonyms-batch-adaptation-worker"])
    changed["synonyms"]["table"]["rectum"] = ["Rektum_site"]
    again = copy.deepcopy(SCENARIOS["synonyms-batch-adaptation-worker"])
    again["config"] = {"JRS_QUEUE_SIZE": "4"}
    for values, same in ((changed, False), (again, True)):
        for component in ("api", "adaptation"):
            workload = _workloads(render(values))[component]
            checksum = workload["spec"]["template"]["metadata"]["annotations"]["checksum/synonyms"]
            assert (checksum in checksums) is same, component
    # podAnnotations are kept beside the checksum
    annotated = render({**SYNONYMS, "podAnnotations": {"example.org/team": "rt"}})
    annotations = _one(annotated, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["example.org/team"] == "rt" and "checksum/synonyms" in annotations


def test_synonyms_from_an_existing_config_map(
    render: Callable[[dict[str, Any]], Manifests],
) -> None:
    values = {
        "synonyms": {
            "existingConfigMap": "site-roi-names",
            "key": "rois.yaml",
            "mountPath": "/srv/jrs/rois",
        },
        **BATCH,
        **ADAPT_SERVICE,
    }
    docs = render(values)
    assert "ConfigMap" not in _kinds(docs), "the chart creates none"
    workloads = _workloads(docs)
    for component in ("api", "batch"):
        volume, mount = _synonym_mount(workloads[component])
        assert volume["configMap"]["name"] == "site-roi-names"
        assert volume["configMap"]["items"] == [{"key": "rois.yaml", "path": "rois.yaml"}]
        assert mount["readOnly"] is True
        assert _mounted_file(workloads[component]) == "/srv/jrs/rois/rois.yaml"
    assert _env(_container(workloads["api"]))["JRS_SYNONYMS"] == "/srv/jrs/rois/rois.yaml"
    # the chart does not know the content: no checksum (NOTES.txt says to restart)
    assert "checksum/synonyms" not in json.dumps(docs)


def test_synonyms_load_as_service_settings_and_cli_options(
    render: Callable[[dict[str, Any]], Manifests], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The rendered file, at the path the environment names, is loaded by the real settings; the
    worker's `jrs adapt` and the batch Job's `jrs batch` get it as --synonyms (nothing is run)."""
    typer_main = pytest.importorskip("typer.main")
    settings_module = pytest.importorskip("jrs.service.settings")
    patients = pytest.importorskip("jrs.service.patients")
    from jrs.cli.main import app
    from jrs.core.labels import SynonymTable
    from jrs.service.errors import ConfigurationError

    command = typer_main.get_command(app)

    def parse(argv: list[str]) -> dict[str, Any]:
        ctx = command.make_context("jrs", list(argv))
        sub = command.get_command(ctx, argv[0])
        assert sub is not None
        params: dict[str, Any] = sub.make_context(argv[0], argv[1:], parent=ctx).params
        return params

    docs = render(SCENARIOS["synonyms-batch-adaptation-worker"])
    content = _one(docs, "ConfigMap")["data"]["synonyms.yaml"]
    workloads = _workloads(docs)
    root = tmp_path / "pod"  # stands for the pod's filesystem: the ConfigMap at its mount path
    assert SynonymTable().organ_of("Prost MR: site") is None, "not a built-in name"

    for component in ("api", "adaptation"):
        container = _container(workloads[component])
        monkeypatch.chdir(tmp_path)  # no .env file
        for key in [k for k in os.environ if k.startswith("JRS_")]:
            monkeypatch.delenv(key)
        for item in container["env"]:
            if "value" in item and item["name"].startswith("JRS_"):
                monkeypatch.setenv(item["name"], item["value"])
        monkeypatch.delenv("JRS_API_KEYS_FILE", raising=False)
        mounted = os.environ["JRS_SYNONYMS"]
        assert mounted == _mounted_file(workloads[component])
        assert Path(mounted).is_absolute()
        local = root / Path(mounted).relative_to("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(content, encoding="utf-8")
        monkeypatch.setenv("JRS_SYNONYMS", str(local))

        settings = settings_module.load_settings(insecure_dev=True)
        assert settings.synonyms == local
        table = settings.synonym_table
        assert table.organ_of("Prost MR: site") == "prostate"
        assert table.organ_of("CTVp") == "prostate" and table.organ_of("SV_prox") == (
            "seminal_vesicles"
        )
        assert table.organ_of("no") == "bladder" and table.organ_of("1.10") == "bladder"
        assert table.prefer_automatic is True
        if component == "adaptation":
            argv = patients.adapt_command(settings, Path("/var/lib/jrs/patients/p1"))
            assert argv[argv.index("--synonyms") + 1] == str(local)
            assert parse(argv[3:])["synonyms"] == local

        # the service refuses to start with a file that is not a table, and names it
        local.write_text("prostate: CTVp\n", encoding="utf-8")
        with pytest.raises(ConfigurationError, match="JRS_SYNONYMS") as caught:
            settings_module.load_settings(insecure_dev=True)
        assert str(local) in str(caught.value)

    args = _container(workloads["batch"])["args"]
    params = parse([a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in args])
    assert params["synonyms"] == Path(SYNONYMS_MOUNTED)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {**SYNONYMS, "config": {"JRS_SYNONYMS": "/etc/site.yaml"}},
            "config.JRS_SYNONYMS conflicts with synonyms.table",
        ),
        (
            {"synonyms": {"existingConfigMap": "rois"}, "config": {"JRS_SYNONYMS": "/x.yaml"}},
            "config.JRS_SYNONYMS conflicts with synonyms.existingConfigMap",
        ),
        (
            {**SYNONYMS, "extraEnv": [{"name": "JRS_SYNONYMS", "value": "/x.yaml"}]},
            "extraEnv JRS_SYNONYMS conflicts",
        ),
        (
            {"synonyms": {"table": SITE_SYNONYMS, "existingConfigMap": "rois"}},
            "are both set",
        ),
        (
            {**SYNONYMS, "batchJob": {**BATCH["batchJob"], "extraArgs": ["--synonyms=/x.yaml"]}},
            "batchJob.extraArgs has --synonyms",
        ),
    ],
)
def test_synonyms_refuse_a_second_source(
    chart: Any, helm: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=message):
        chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)


def test_jrs_synonyms_in_config_alone_still_renders(
    render: Callable[[dict[str, Any]], Manifests],
) -> None:
    """Without the synonyms values, config.JRS_SYNONYMS (a file mounted through volumes) works
    as before."""
    docs = render({"config": {"JRS_SYNONYMS": "/site/synonyms.yaml"}})
    assert _env(_container(_one(docs, "Deployment")))["JRS_SYNONYMS"] == "/site/synonyms.yaml"
    assert "ConfigMap" not in _kinds(docs)


def test_schema_organ_keys_are_the_synonym_tables() -> None:
    from jrs.core.labels import LABELS, LANDMARKS

    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    table = schema["properties"]["synonyms"]["properties"]["table"]
    assert set(table["propertyNames"]["enum"]) == {
        *LABELS.values(),
        *LANDMARKS,
        "prefer_automatic",
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"synonyms": {"table": ["prostate", "CTVp"]}}, "/synonyms/table"),
        ({"synonyms": {"table": "prostate: [CTVp]"}}, "/synonyms/table"),
        ({"synonyms": {"table": {"prostate": "CTVp"}}}, "/synonyms/table/prostate"),
        ({"synonyms": {"table": {"bladder": ["Blase", False]}}}, "/synonyms/table/bladder/1"),
        ({"synonyms": {"table": {"kidney": ["Niere"]}}}, "kidney"),
        ({"synonyms": {"table": {"prefer_automatic": "yes"}}}, "prefer_automatic"),
        ({"synonyms": {"existingConfigMap": 5}}, "existingConfigMap"),
        ({"synonyms": {"key": "rois/site.yaml"}}, "/synonyms/key"),
        ({"synonyms": {"mountPath": "etc/jrs"}}, "/synonyms/mountPath"),
        ({"synonyms": {"mountPath": "/"}}, "/synonyms/mountPath"),
        ({"synonyms": {"file": "site.yaml"}}, "file"),
    ],
)
def test_schema_rejects_bad_synonyms_values(
    chart: Any, helm: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError) as caught:
        chart.validate_schema(chart.merge_values(copy.deepcopy(values)))
    assert message in str(caught.value)
    with pytest.raises(helm.HelmError):
        chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)


def test_notes_explain_synonyms(chart: Any) -> None:
    notes = chart.render(copy.deepcopy(SYNONYMS), name=RELEASE, namespace=NAMESPACE)[
        "jrs/templates/NOTES.txt"
    ]
    assert f"ConfigMap {RELEASE}-jrs-synonyms" in notes and SYNONYMS_MOUNTED in notes
    assert "After changing the ConfigMap" not in notes, "a changed table rolls the pods"
    existing = chart.render(
        {"synonyms": {"existingConfigMap": "rois"}}, name=RELEASE, namespace=NAMESPACE
    )["jrs/templates/NOTES.txt"]
    assert "After changing the ConfigMap" in existing and "ConfigMap rois" in existing
    plain = chart.render({}, name=RELEASE, namespace=NAMESPACE)["jrs/templates/NOTES.txt"]
    assert "synonym" not in plain.lower()
