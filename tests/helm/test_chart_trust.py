"""Trust and encryption values (SECURITY.md) reach every Ray pod, and no key does."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from conftest import CHART, CI_VALUES, Docs, Renderer, one

from serving.settings import get_settings

pytestmark = pytest.mark.helm

CI_IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
TRUST = CHART / "ci" / "trust-values.yaml"
IRSA = CHART / "ci" / "irsa-ephemeral-values.yaml"
KEYS_DIR = "/etc/serving/trusted-keys"
TRUST_ENV = {
    "SERVING_REQUIRE_SIGNATURE",
    "SERVING_TRUSTED_KEYS",
    "SERVING_UNRESTRICTED_MODELS",
    "SERVING_TRUSTED_GLOBALS",
    "SERVING_ENCRYPTION_KEY_FILE",
    "SERVING_ENCRYPTION_KMS_KEY_ID",
    "SERVING_S3_SSE",
    "SERVING_S3_SSE_KMS_KEY_ID",
    "SERVING_S3_SSE_C_KEY",
}


def ray_pods(docs: Docs) -> dict[str, dict[str, Any]]:
    """``where -> pod spec`` for the head and every worker group."""
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def _env(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in pod["containers"][0]["env"]}


def _helm_template(
    helm: Path, values: Iterable[Path] = (), sets: Iterable[str] = ()
) -> subprocess.CompletedProcess[str]:
    cmd = [str(helm), "template", "x", str(CHART), "--api-versions", "ray.io/v1/RayService"]
    for v in values:
        cmd += ["--values", str(v)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_trusted_keys_secret_is_mounted_read_only_in_head_and_workers(render: Callable[..., Docs]) -> None:
    """requireSignature + trustedKeys.existingSecret: every Ray pod (head and each worker
    group) gets the env, a read-only mount and the Secret volume."""
    pods = ray_pods(render(values=[IRSA, TRUST]))
    assert set(pods) == {"head", "cpu-small", "cpu-large"}
    for where, pod in pods.items():
        env = _env(pod)
        assert env["SERVING_REQUIRE_SIGNATURE"]["value"] == "true", where
        assert env["SERVING_TRUSTED_KEYS"]["value"] == KEYS_DIR, where
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["trusted-keys"] == {"name": "trusted-keys", "mountPath": KEYS_DIR, "readOnly": True}, (
            where
        )
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["trusted-keys"]["secret"]["secretName"] == "serving-trusted-keys", where


def test_key_files_are_readable_by_the_pod_uid_only(render: Callable[..., Docs]) -> None:
    """Secret volumes are 0440 and the pod has an fsGroup, so the non-root uid reads
    them through its group and other users cannot."""
    for where, pod in ray_pods(render(values=[TRUST])).items():
        assert pod["securityContext"]["fsGroup"] == 1000, where
        secrets = [v["secret"] for v in pod["volumes"] if "secret" in v]
        assert len(secrets) == 2, where
        for secret in secrets:
            assert secret["defaultMode"] == 0o440, where


def test_encryption_key_secret_mounts_one_file_named_by_the_env(render: Callable[..., Docs]) -> None:
    """encryption.keySecret projects only its key, as `kek`, under the mount path that
    SERVING_ENCRYPTION_KEY_FILE names."""
    for where, pod in ray_pods(render(values=[TRUST])).items():
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["encryption-key"]["secret"]["items"] == [{"key": "data.kek", "path": "kek"}], where
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        mount = mounts["encryption-key"]
        assert mount["readOnly"] is True, where
        assert _env(pod)["SERVING_ENCRYPTION_KEY_FILE"]["value"] == f"{mount['mountPath']}/kek", where


def test_rendered_env_parses_into_the_intended_settings(
    render: Callable[..., Docs], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The env the chart renders parses with serving.settings into the values given:
    comma lists for keys and models, a JSON list for trusted globals."""
    (pod, *_) = ray_pods(render(values=[TRUST])).values()
    for name, entry in _env(pod).items():
        if name.startswith("SERVING_") and "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    settings = get_settings()
    assert settings.require_signature is True
    assert settings.trusted_keys == [Path(KEYS_DIR)]
    assert settings.unrestricted_models == ["legacy-keras", "fraud"]
    assert settings.trusted_globals == ["mypkg.features.Scaler", "mypkg.features.clip"]
    assert settings.encryption_key_file == Path("/etc/serving/encryption/kek")
    assert settings.encryption_kms_key_id == "alias/serving-models"
    assert settings.s3_sse == "aws:kms"
    assert settings.s3_sse_kms_key_id is not None
    assert settings.s3_sse_kms_key_id.startswith("arn:aws:kms:")


def test_sse_c_key_comes_only_from_a_secret_key_ref(render: Callable[..., Docs]) -> None:
    """store.sse.customerKey renders a secretKeyRef on every Ray pod, never a value."""
    sets = ("store.sse.customerKey.existingSecret=serving-sse-c", "store.sse.customerKey.key=k")
    for where, pod in ray_pods(render(sets=sets)).items():
        entry = _env(pod)["SERVING_S3_SSE_C_KEY"]
        assert entry == {
            "name": "SERVING_S3_SSE_C_KEY",
            "valueFrom": {"secretKeyRef": {"name": "serving-sse-c", "key": "k"}},
        }, where


def test_defaults_render_no_trust_settings(render: Callable[..., Docs]) -> None:
    """With default values no trust env or Secret volume is rendered: the settings'
    own defaults apply."""
    for where, pod in ray_pods(render()).items():
        assert not TRUST_ENV & set(_env(pod)), where
        assert not [v for v in pod["volumes"] if "secret" in v], where


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_no_key_material_in_rendered_output(renderer: Renderer, values: Path) -> None:
    """No PEM block anywhere, no rendered Secret for trust or encryption, and every
    key-bearing env var is a path, an id, or a secretKeyRef."""
    text = renderer.text(values=[values])
    assert "-----BEGIN" not in text
    docs = renderer.docs(values=[values])
    secrets = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
    assert not [s for s in secrets if "trusted" in s or "encryption" in s]
    for where, pod in ray_pods(docs).items():
        for name, entry in _env(pod).items():
            if name.endswith(("_KEY", "_SECRET_ACCESS_KEY")):
                assert "value" not in entry, (where, name)


@pytest.mark.parametrize(
    "setting",
    [
        "trust.trustedKeyz.existingSecret=x",
        "trust.trustedKeys.pem=abc",
        "trust.publicKeys[0]=abc",
        "encryption.key=abc",
        "store.sse.customerKey.value=abc",
        "trust.trustedKeys.existingSecret=-----BEGIN PUBLIC KEY-----",
    ],
    ids=["typo", "inline-pem", "unknown-list", "inline-kek", "inline-sse-c", "pem-as-secret-name"],
)
def test_schema_refuses_unknown_trust_keys_and_inline_keys(helm: Path, setting: str) -> None:
    """Unknown keys under trust/encryption/store.sse are refused, so there is no place
    to paste key material into values."""
    done = _helm_template(helm, sets=[setting])
    assert done.returncode != 0, setting
    assert "values don't meet the specifications of the schema" in done.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["trust.requireSignature=true"], "trust.requireSignature needs trust.trustedKeys.existingSecret"),
        (
            ["store.sse.mode=AES256", "store.sse.customerKey.existingSecret=s"],
            "store.sse.mode and store.sse.customerKey are exclusive",
        ),
        (["store.sse.kmsKeyId=alias/k"], "store.sse.kmsKeyId needs store.sse.mode aws:kms"),
        (
            [
                "trust.trustedKeys.existingSecret=a",
                "encryption.keySecret.existingSecret=b",
                "encryption.keySecret.mountPath=/etc/serving/trusted-keys",
            ],
            "must differ",
        ),
    ],
    ids=["signature-without-keys", "sse-and-sse-c", "kms-key-without-kms", "same-mount-path"],
)
def test_unworkable_combinations_fail_at_render(helm: Path, sets: list[str], message: str) -> None:
    """Settings that would deploy but never work fail `helm template` with a message."""
    done = _helm_template(helm, sets=sets)
    assert done.returncode != 0
    assert message in done.stderr


def test_trusted_keys_may_come_from_extra_env(helm: Path) -> None:
    """requireSignature is accepted without the Secret when extraEnv sets
    SERVING_TRUSTED_KEYS (keys baked into the image)."""
    sets = [
        "trust.requireSignature=true",
        "extraEnv[0].name=SERVING_TRUSTED_KEYS",
        "extraEnv[0].value=/opt/keys",
    ]
    done = _helm_template(helm, sets=sets)
    assert done.returncode == 0, done.stderr


def test_trust_changes_the_cluster_spec_but_not_the_serve_config(renderer: Renderer) -> None:
    """Trust settings change the pod spec (a KubeRay cluster upgrade), while the serve
    config, and so the alias each model follows, stays as it was."""

    def spec(*values: Path) -> dict[str, Any]:
        doc = renderer.docs(values=values, show_only=("templates/rayservice.yaml",))[0]
        return dict(doc["spec"])

    base = spec()
    trusted = spec(TRUST)
    assert json.dumps(base["rayClusterConfig"], sort_keys=True) != json.dumps(
        trusted["rayClusterConfig"], sort_keys=True
    )
    assert trusted["serveConfigV2"] == base["serveConfigV2"].replace(
        "s3://models/serving", "s3://ml-models/signed"
    )
    assert "alias: production" in trusted["serveConfigV2"]


OCI_OMS = CHART / "ci" / "oci-oms-values.yaml"


def test_registry_secrets_and_oms_signers_are_mounted_and_named_by_the_env(
    render: Callable[..., Docs], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OCI store's pull secret and CA, and the OMS signers' keys, reach every Ray pod as
    read-only files; the env the chart renders parses into settings that point at them."""
    for where, pod in ray_pods(render(values=[OCI_OMS])).items():
        env = _env(pod)
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["oci-docker-config"]["secret"]["items"] == [
            {"key": ".dockerconfigjson", "path": "config.json"}
        ], where
        assert volumes["oci-ca"]["secret"]["secretName"] == "registry-ca", where
        assert volumes["oms-keys"]["secret"]["secretName"] == "oms-signers", where
        for name in ("oci-docker-config", "oci-ca", "oms-keys"):
            assert mounts[name]["readOnly"] is True, (where, name)
            assert volumes[name]["secret"]["defaultMode"] == 0o440, (where, name)
        assert (
            env["SERVING_OCI_DOCKER_CONFIG"]["value"]
            == f"{mounts['oci-docker-config']['mountPath']}/config.json"
        )
        assert env["SERVING_OCI_CA_FILE"]["value"] == f"{mounts['oci-ca']['mountPath']}/ca.crt"
        assert env["SERVING_OMS_PUBLIC_KEYS"]["value"] == mounts["oms-keys"]["mountPath"]
    (pod, *_) = ray_pods(render(values=[OCI_OMS])).values()
    for name, entry in _env(pod).items():
        if name.startswith("SERVING_") and "value" in entry:
            monkeypatch.setenv(name, entry["value"])
    settings = get_settings()
    assert settings.store == "oci://registry.ml.svc:5000/models"
    assert settings.require_oms_signature is True
    assert settings.oms_public_keys == [Path("/etc/serving/oms-keys")]
    assert settings.oci_ca_file == Path("/etc/serving/oci/ca/ca.crt")


def test_requiring_oms_signatures_without_a_signer_fails_the_render(helm: Path) -> None:
    done = _helm_template(helm, sets=["trust.oms.requireSignature=true"])
    assert done.returncode != 0
    assert "trust.oms.requireSignature needs trust.oms.publicKeys.existingSecret" in done.stderr
