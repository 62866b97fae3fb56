"""Template unit tests: render with values, assert on the documents."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CHART, CI_VALUES, RELEASE, Docs, Renderer, by_kind, one

from serving.config import AppConfig

pytestmark = pytest.mark.helm

CI_IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
MINIO = CHART / "ci" / "minio-values.yaml"
S3_SECRET = CHART / "ci" / "s3-secret-values.yaml"
IRSA = CHART / "ci" / "irsa-ephemeral-values.yaml"
HOSTPATH = CHART / "ci" / "hostpath-values.yaml"


def pod_specs(docs: Docs) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec the chart renders: Ray head/workers, MinIO, jobs, test pods."""
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            yield f"{name}/head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster["workerGroupSpecs"]:
                yield f"{name}/{group['groupName']}", group["template"]["spec"]
        elif kind in ("Deployment", "Job"):
            yield f"{kind}/{name}", doc["spec"]["template"]["spec"]
        elif kind == "Pod":
            yield f"Pod/{name}", doc["spec"]


def ray_containers(docs: Docs) -> list[dict[str, Any]]:
    rs = one(docs, "RayService")["spec"]["rayClusterConfig"]
    pods = [rs["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rs["workerGroupSpecs"]]
    return [p["containers"][0] for p in pods]


def serve_config(docs: Docs) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    return loaded


# -- security ------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_every_pod_runs_non_root_with_restricted_security(render: Callable[..., Docs], values: Any) -> None:
    """Every pod: runAsNonRoot, seccomp RuntimeDefault; every container: no privilege
    escalation, all capabilities dropped, read-only root filesystem."""
    docs = render(values=[values])
    specs = list(pod_specs(docs))
    assert specs
    for where, spec in specs:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (where, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (where, c["name"])


def test_ray_pods_get_writable_scratch_and_cache(render: Callable[..., Docs]) -> None:
    """With a read-only root, /tmp (Ray's session dir), /dev/shm and the cache are volumes."""
    docs = render()
    for c in ray_containers(docs):
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/dev/shm", "/var/cache/serving"} <= mounts


def test_autoscaler_sidecar_is_restricted_too(render: Callable[..., Docs]) -> None:
    """The autoscaler container KubeRay injects gets the same security context."""
    opts = one(render(), "RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert opts["securityContext"]["readOnlyRootFilesystem"] is True
    assert opts["securityContext"]["capabilities"]["drop"] == ["ALL"]


# -- store credentials ---------------------------------------------------------


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def test_existing_secret_is_referenced_not_copied(render: Callable[..., Docs]) -> None:
    """Access keys come from secretKeyRef on the named Secret; no Secret is rendered."""
    docs = render(values=[S3_SECRET])
    assert not by_kind(docs, "Secret")
    for c in ray_containers(docs):
        env = _env(c)
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
            "name": "serving-s3-credentials",
            "key": "access-key",
        }
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "secret-key"
        assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
        assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.eu-central-1.example.com"
        assert env["SERVING_S3_ADDRESSING_STYLE"]["value"] == "virtual"


def test_ray_containers_run_serve_behind_haproxy_by_default(render: Callable[..., Docs]) -> None:
    """Every Ray container gets Ray's high-throughput env (head and workers: each runs HAProxy)."""
    for c in ray_containers(render()):
        env = _env(c)
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"
        # NOTE: without it Serve's autoscaler sees no ongoing request behind HAProxy.
        assert env["RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE"]["value"] == "0"
        # NOTE: one thread per replica for requests: two fought for the GIL (issue 21).
        assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"]["value"] == "0"
        # NOTE: HAProxy's per-request metrics cost a Python parse per request; serving_* cover them.
        assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"]["value"] == "0"
        # NOTE: Ray's defaults held 4,200 silent connections for an hour (issue 21).
        assert env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"]["value"] == "10"
        assert env["RAY_SERVE_HAPROXY_MAXCONN"]["value"] == "8192"
    sets = ["serve.connections.maxConnections=500", "serve.connections.clientTimeoutSeconds=3"]
    for c in ray_containers(render(sets=sets)):
        assert _env(c)["RAY_SERVE_HAPROXY_MAXCONN"]["value"] == "500"
        assert _env(c)["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"]["value"] == "3"
    for c in ray_containers(render(values=[IRSA])):
        assert "RAY_SERVE_ENABLE_HA_PROXY" not in _env(c)
    for c in ray_containers(render(sets=["serve.haproxyMetrics=true"])):
        assert "RAY_SERVE_HAPROXY_METRICS_ENABLED" not in _env(c)


def test_the_admin_token_comes_from_a_secret(render: Callable[..., Docs]) -> None:
    """SERVING_ADMIN_TOKEN is a secretKeyRef when admin.existingSecret is set, absent otherwise."""
    for c in ray_containers(render()):
        assert "SERVING_ADMIN_TOKEN" not in _env(c)
    for c in ray_containers(render(values=[IRSA])):
        token = _env(c)["SERVING_ADMIN_TOKEN"]
        assert token == {
            "name": "SERVING_ADMIN_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "serving-admin", "key": "admin-token"}},
        }


def test_irsa_uses_service_account_and_no_keys(render: Callable[..., Docs]) -> None:
    """With IRSA the ServiceAccount carries the role and pods get no access-key env."""
    docs = render(values=[IRSA])
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for c in ray_containers(docs):
        assert "AWS_ACCESS_KEY_ID" not in _env(c)
    rs = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert rs["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_dev_minio_wires_endpoint_path_style_and_generated_secret(render: Callable[..., Docs]) -> None:
    """minio.enabled: endpoint, path-style addressing and the generated Secret are used."""
    docs = render(values=[MINIO])
    secret = one(docs, "Secret")
    assert len(base64.b64decode(secret["data"]["root-password"])) == 32
    env = _env(ray_containers(docs)[0])
    assert env["AWS_ENDPOINT_URL"]["value"] == f"http://{RELEASE}-minio.ml.svc:9000"
    assert env["SERVING_S3_ADDRESSING_STYLE"]["value"] == "path"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "root-password",
    }
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PersistentVolumeClaim", "Job"}


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_no_secret_material_in_configmaps_or_plain_env(render: Callable[..., Docs], values: Any) -> None:
    """ConfigMaps and plain env values never carry credentials."""
    docs = render(values=[values])
    for cm in by_kind(docs, "ConfigMap"):
        text = json.dumps(cm.get("data", {})).lower()
        assert "secret_access_key" not in text
        assert "password" not in text
    for c in ray_containers(docs):
        for e in c["env"]:
            if any(w in e["name"] for w in ("SECRET", "PASSWORD", "ACCESS_KEY")):
                assert "value" not in e, e["name"]


# -- monitoring ----------------------------------------------------------------


def test_monitoring_kinds_render_only_with_their_api(render: Callable[..., Docs]) -> None:
    """PodMonitor and PrometheusRule appear only when monitoring.coreos.com/v1 is served."""
    with_api = render()
    assert by_kind(with_api, "PodMonitor")
    assert by_kind(with_api, "PrometheusRule")
    only_ray = render(api_versions=("ray.io/v1/RayService",))
    assert not by_kind(only_ray, "PodMonitor")
    assert not by_kind(only_ray, "PrometheusRule")
    assert by_kind(only_ray, "RayService")
    assert not by_kind(render(api_versions=()), "RayService")


def test_podmonitor_scrapes_the_ray_metrics_port(render: Callable[..., Docs]) -> None:
    """The PodMonitor targets the port named `metrics`, which is rayStartParams' export port."""
    docs = render()
    pm = one(docs, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    rs = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert rs["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    for c in ray_containers(docs):
        assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= (
        rs["headGroupSpec"]["template"]["metadata"]["labels"].items()
    )


def test_service_monitor_replaces_pod_monitor_when_chosen(render: Callable[..., Docs]) -> None:
    """minio-values turns the ServiceMonitor on and the PodMonitor off."""
    docs = render(values=[MINIO])
    assert by_kind(docs, "ServiceMonitor")
    assert not by_kind(docs, "PodMonitor")


def test_dashboard_configmap_carries_sidecar_label_and_json(render: Callable[..., Docs]) -> None:
    """The dashboard ConfigMap has the Grafana sidecar label and parses as JSON."""
    maps = by_kind(render(values=[S3_SECRET]), "ConfigMap")
    cm = [c for c in maps if c["metadata"]["name"].endswith("dashboard")]
    assert cm[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm[0]["metadata"]["annotations"]["grafana_folder"] == "ML"
    assert json.loads(cm[0]["data"]["serving-dashboard.json"])["uid"] == "serving-overview"


# -- serve config ----------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_serve_config_parses_with_the_app_config_model(render: Callable[..., Docs], values: Any) -> None:
    """serveConfigV2's args parse with serving.config.AppConfig, as build_app parses them."""
    cfg = serve_config(render(values=[values]))
    (app,) = cfg["applications"]
    assert app["import_path"] == "serving.server.ray.app:build_app"
    parsed = AppConfig.model_validate(app["args"])
    assert parsed.models
    assert parsed.cache_dir == "/var/cache/serving"
    assert cfg["http_options"]["port"] == 8000


def test_serve_config_carries_models_store_poll_and_cache(render: Callable[..., Docs]) -> None:
    """Models, store URI, poll interval and cache budget come from values."""
    parsed = AppConfig.model_validate(serve_config(render(values=[IRSA]))["applications"][0]["args"])
    assert [m.ref for m in parsed.models] == ["resnet@production", "fraud:42"]
    assert parsed.models[0].batching.enabled
    assert parsed.models[0].batching.max_batch_size == 16
    assert parsed.poll_interval_s == 2
    assert parsed.cache_max_bytes == 40_000_000_000
    assert parsed.store == "s3://models/serving"
    assert parsed.layout == "two-hop"
    assert parsed.body_timeout_s == 30


def test_shared_workers_and_each_models_isolation_reach_the_app(
    render: Callable[..., Docs], tmp_path: Path
) -> None:
    """serve.shared_workers and a model's isolation, workers and predict limits pass the schema and
    reach the app's config."""
    values = tmp_path / "shared-values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "serve": {
                    "models": [
                        {"name": "iris", "alias": "production"},
                        {
                            "prefix": "tenant-",
                            "alias": "production",
                            "isolation": "worker",
                            "workers": "shared",
                            "predict_timeout_s": 5,
                            "probation_requests": 3,
                        },
                    ],
                    "shared_workers": {
                        "count": 3,
                        "memory_bytes": 2147483648,
                        "keep_idle_s": 30,
                        "prestart": ["sklearn"],
                    },
                }
            }
        )
    )
    parsed = AppConfig.model_validate(serve_config(render(values=[values]))["applications"][0]["args"])
    member = parsed.models[1]
    assert (member.workers, member.predict_timeout_s, member.probation_requests) == ("shared", 5, 3)
    assert parsed.models[0].workers == "dedicated"
    assert (parsed.shared_workers.count, parsed.shared_workers.memory_bytes) == (3, 2147483648)
    assert (parsed.shared_workers.keep_idle_s, parsed.shared_workers.prestart) == (30, ["sklearn"])


def test_replica_access_logs_are_off_unless_asked_for(render: Callable[..., Docs]) -> None:
    """serve.accessLog reaches the app's access_log (Ray Serve's per-request log line)."""
    args = lambda docs: AppConfig.model_validate(serve_config(docs)["applications"][0]["args"])  # noqa: E731
    assert args(render()).access_log is False
    assert args(render(sets=["serve.accessLog=true"])).access_log is True


def test_autoscaling_turns_on_the_in_tree_autoscaler(render: Callable[..., Docs]) -> None:
    """Defaults: enableInTreeAutoscaling plus a Serve autoscaling_config; off when disabled."""
    on = one(render(), "RayService")["spec"]
    assert on["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    args = serve_config(render())["applications"][0]["args"]
    # NOTE: single-hop replicas serve every model; the ingress block scales them.
    assert args["layout"] == "single-hop"
    assert args["ingress"]["autoscaling_config"]["max_replicas"] >= 1
    off = one(render(values=[IRSA]), "RayService")["spec"]["rayClusterConfig"]
    assert off["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in off


# -- rollout safety --------------------------------------------------------------


def _cluster_config(renderer: Renderer, *sets: str) -> str:
    doc = renderer.docs(sets=sets, show_only=("templates/rayservice.yaml",))[0]
    return json.dumps(doc["spec"]["rayClusterConfig"], sort_keys=True)


def test_alias_or_serve_setting_changes_leave_the_cluster_spec_alone(renderer: Renderer) -> None:
    """Serve-level changes land in serveConfigV2 only, so no pod is rolled."""
    base = _cluster_config(renderer)
    assert _cluster_config(renderer, "serve.models[0].name=iris", "serve.models[0].alias=staging") == base
    assert _cluster_config(renderer, "serve.pollIntervalSeconds=1") == base


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_no_checksum_annotations(renderer: Renderer, values: Any) -> None:
    """Nothing is checksum-annotated, so no config content can roll pods."""
    assert "checksum/" not in renderer.text(values=[values])


def test_pod_templates_carry_no_chart_version(render: Callable[..., Docs]) -> None:
    """A chart version bump alone does not start a new Ray cluster."""
    rs = one(render(), "RayService")["spec"]["rayClusterConfig"]
    labels = rs["headGroupSpec"]["template"]["metadata"]["labels"]
    assert "helm.sh/chart" not in labels
    assert "app.kubernetes.io/version" not in labels


# -- volumes and scheduling -------------------------------------------------------


def _cache_volume(docs: Docs, group: int = 0) -> dict[str, Any]:
    rs = one(docs, "RayService")["spec"]["rayClusterConfig"]
    spec = rs["workerGroupSpecs"][group]["template"]["spec"]
    (vol,) = [v for v in spec["volumes"] if v["name"] == "model-cache"]
    return vol


def test_cache_volume_types(render: Callable[..., Docs]) -> None:
    """emptyDir with sizeLimit by default; PVC, ephemeral and hostPath when chosen."""
    assert _cache_volume(render())["emptyDir"]["sizeLimit"] == "10Gi"
    pvc = _cache_volume(render(values=[MINIO]))["persistentVolumeClaim"]
    assert pvc["claimName"] == "serving-model-cache"
    eph = _cache_volume(render(values=[IRSA]))["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert eph["resources"]["requests"]["storage"] == "50Gi"
    assert _cache_volume(render(values=[HOSTPATH]))["hostPath"]["path"] == "/mnt/serving-cache"


def test_worker_groups_resources_and_scheduling(render: Callable[..., Docs]) -> None:
    """Each worker group gets its own resources, replicas and tolerations."""
    rs = one(render(values=[IRSA]), "RayService")["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in rs["workerGroupSpecs"]}
    assert set(groups) == {"cpu-small", "cpu-large"}
    large = groups["cpu-large"]
    assert large["rayStartParams"]["num-cpus"] == "8"
    assert large["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "8"
    assert large["template"]["spec"]["tolerations"][0]["key"] == "dedicated"


def test_pdb_and_network_policy(render: Callable[..., Docs]) -> None:
    """The PDB covers worker pods; the NetworkPolicy opens Serve and metrics to the given peers."""
    docs = render(values=[MINIO])
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ray-worker"
    np = one(docs, "NetworkPolicy")
    ports = [r["ports"][0]["port"] for r in np["spec"]["ingress"] if "ports" in r]
    assert ports == [8000, 8080]
    assert not by_kind(render(), "NetworkPolicy")


def test_helm_test_pod_checks_readiness_endpoint(render: Callable[..., Docs]) -> None:
    """`helm test` GETs /v2/health/ready on the Serve service."""
    pod = one(render(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    url = pod["spec"]["containers"][0]["args"][-1]
    assert url == f"http://{RELEASE}-serve-svc.ml.svc:8000/v2/health/ready"
