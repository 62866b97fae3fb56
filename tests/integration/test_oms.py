"""OpenSSF model signatures (OMS): made by ``serving sign`` or by the ``model-signing`` CLI, verified
at load against the trust policy before any byte of the version is fetched. Keys and certificates
are made in the test; nothing touches the network."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import joblib
import pytest
from cli_runner import run_cli
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.cache import LoaderCache
from serving.errors import UntrustedArtifact
from serving.manifest import ModelRef
from serving.repository import Repository
from serving.settings import Settings
from serving.store.local import LocalStore
from serving.trust import check_trust

pytest.importorskip("model_signing", reason="the oms extra is not installed")

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

X, Y = load_iris(return_X_y=True)
ROW = "[[5.1, 3.5, 1.4, 0.2]]"
MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    for name in (
        "SERVING_REQUIRE_OMS_SIGNATURE",
        "SERVING_OMS_PUBLIC_KEYS",
        "SERVING_OMS_CERTIFICATE_CHAINS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SERVING_STORE", str(root))
    monkeypatch.setenv("SERVING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SERVING_PROGRESS", "false")
    return root


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "iris-model"
    folder.mkdir()
    joblib.dump(LogisticRegression(max_iter=500).fit(X, Y), folder / "model.joblib")
    (folder / "config.json").write_text(json.dumps({"classes": ["setosa", "versicolor", "virginica"]}))
    return folder


def _keys(capsys: pytest.CaptureFixture[str], prefix: Path) -> tuple[Path, Path]:
    code, _, err = run_cli(capsys, "keygen", str(prefix), "--oms")
    assert code == 0, err
    return prefix.with_suffix(".key"), prefix.with_suffix(".pub")


def _require(monkeypatch: pytest.MonkeyPatch, **signers: object) -> None:
    """A serving node that requires OMS signatures, with a cache of its own (``serving sign`` pulled
    the version into the publisher's)."""
    monkeypatch.setenv("SERVING_CACHE_DIR", str(Path(str(signers.pop("node"))) / "node-cache"))
    monkeypatch.setenv("SERVING_REQUIRE_OMS_SIGNATURE", "true")
    for name, value in signers.items():
        monkeypatch.setenv(f"SERVING_OMS_{name.upper()}", str(value))


def _predict(capsys: pytest.CaptureFixture[str], ref: str) -> tuple[int, str, str]:
    return run_cli(capsys, "predict", ref, "--input", ROW)


def _nothing_fetched(store: Path, tmp_path: Path, ref: str) -> bool:
    """No file of ``ref`` reached this node's cache (the refusal came before any download)."""
    repo = Repository(LocalStore(str(store)))
    cache = LoaderCache(tmp_path / "node-cache", 1 << 30)
    resolved, _ = cache.resolve(repo, ModelRef.parse(ref))
    return cache.get(resolved.name, resolved.version, resolved.manifest_sha256) is None


def test_serving_signs_a_version_and_a_policy_that_requires_it_loads_it(
    store: Path,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, pub = _keys(capsys, tmp_path / "signer")
    assert run_cli(capsys, "publish", str(model), "--name", "iris", "--format", "sklearn")[0] == 0
    code, out, err = run_cli(capsys, "--json", "sign", "iris:1", "--oms-key", str(key))
    assert code == 0, err
    assert json.loads(out)["files"] == 2
    _require(monkeypatch, node=tmp_path, public_keys=pub)
    code, out, err = _predict(capsys, "iris:1")
    assert code == 0, err
    assert json.loads(out)["outputs"]["predict"] == [0]
    code, out, err = run_cli(capsys, "--json", "verify", "iris:1")
    assert code == 0, err
    assert json.loads(out)["oms_signed_by"] == f"key {pub.name}"


def test_an_unsigned_or_wrongly_signed_version_is_refused_before_a_byte_is_fetched(
    store: Path,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, pub = _keys(capsys, tmp_path / "signer")
    other_key, _ = _keys(capsys, tmp_path / "other")
    for _ in range(2):
        assert run_cli(capsys, "publish", str(model), "--name", "iris", "--format", "sklearn")[0] == 0
    assert run_cli(capsys, "sign", "iris:2", "--oms-key", str(other_key))[0] == 0
    _require(monkeypatch, node=tmp_path, public_keys=pub)
    code, _, err = _predict(capsys, "iris:1")
    assert code != 0
    assert "iris:1 has no OpenSSF model signature (oms.sig) and one is required" in err
    code, _, err = _predict(capsys, "iris:2")
    assert code != 0
    assert f"no trusted signer (key {pub.name}: Key mismatch" in err, err
    assert _nothing_fetched(store, tmp_path, "iris:1")
    assert _nothing_fetched(store, tmp_path, "iris:2")


def test_a_signature_moved_to_other_bytes_is_refused_and_names_the_file(
    store: Path,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The publisher of version 2 copies version 1's valid signature beside different weights."""
    key, pub = _keys(capsys, tmp_path / "signer")
    assert run_cli(capsys, "publish", str(model), "--name", "iris", "--format", "sklearn")[0] == 0
    assert run_cli(capsys, "sign", "iris:1", "--oms-key", str(key))[0] == 0
    joblib.dump(LogisticRegression(max_iter=500, C=0.001).fit(X, Y), model / "model.joblib")
    stolen = store / "iris" / "versions" / "1" / "oms.sig"
    code, _, err = run_cli(
        capsys, "publish", str(model), "--name", "iris", "--format", "sklearn", "--oms-signature", str(stolen)
    )
    assert code == 0, err
    _require(monkeypatch, node=tmp_path, public_keys=pub)
    code, _, err = _predict(capsys, "iris:2")
    assert code != 0
    assert "iris:2: model.joblib has sha256" in err, err
    assert "but the OMS signature (key signer.pub) signs" in err
    assert _nothing_fetched(store, tmp_path, "iris:2")
    # NOTE: and a version with a file the signature does not cover
    (model / "extra.txt").write_text("unsigned\n")
    assert run_cli(capsys, "sign", "iris:1", "--oms-key", str(key))[0] == 0
    code, _, err = run_cli(
        capsys, "publish", str(model), "--name", "iris", "--format", "sklearn", "--oms-signature", str(stolen)
    )
    assert code == 0, err
    code, _, err = _predict(capsys, "iris:3")
    assert code != 0
    assert "is not covered by the OMS signature" in err, err


def test_a_directory_signed_by_the_model_signing_cli_is_served_with_its_signature_checked(
    store: Path,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, pub = _keys(capsys, tmp_path / "signer")
    signature = tmp_path / "model.sig"
    done = subprocess.run(
        [MODEL_SIGNING, "sign", "key", str(model), "--private_key", str(key), "--signature", str(signature)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    code, _, err = run_cli(
        capsys,
        "publish",
        str(model),
        "--name",
        "iris",
        "--format",
        "sklearn",
        "--oms-signature",
        str(signature),
    )
    assert code == 0, err
    _require(monkeypatch, node=tmp_path, public_keys=pub)
    code, out, err = _predict(capsys, "iris:1")
    assert code == 0, err
    assert json.loads(out)["outputs"]["predict"] == [0]


def test_a_version_signed_by_serving_verifies_with_the_model_signing_cli(
    store: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = _keys(capsys, tmp_path / "signer")
    _, other_pub = _keys(capsys, tmp_path / "other")
    assert run_cli(capsys, "publish", str(model), "--name", "iris", "--format", "sklearn")[0] == 0
    assert run_cli(capsys, "sign", "iris:1", "--oms-key", str(key))[0] == 0
    code, out, err = run_cli(capsys, "--json", "pull", "iris:1")
    assert code == 0, err
    folder = json.loads(out)["path"]
    signature = store / "iris" / "versions" / "1" / "oms.sig"

    def cli_verify(public: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                MODEL_SIGNING,
                "verify",
                "key",
                folder,
                "--signature",
                str(signature),
                "--public_key",
                str(public),
            ],
            capture_output=True,
            text=True,
        )

    done = cli_verify(pub)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Verification succeeded" in done.stdout + done.stderr
    assert cli_verify(other_pub).returncode != 0


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_certificate_signing_chains_to_the_configured_ca_and_no_other(
    store: Path,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca_key, rogue_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _pem(tmp_path / "ca.pem", _certificate("ml-platform CA", ca_key, None, ca=True))
    rogue = _pem(tmp_path / "rogue.pem", _certificate("ml-platform CA", rogue_key, None, ca=True))
    leaf = _pem(
        tmp_path / "leaf.pem", _certificate("trainer", leaf_key, ("ml-platform CA", ca_key), ca=False)
    )
    leaf_pem = tmp_path / "leaf.key"
    leaf_pem.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert run_cli(capsys, "publish", str(model), "--name", "iris", "--format", "sklearn")[0] == 0
    code, _, err = run_cli(
        capsys,
        "sign",
        "iris:1",
        "--oms-key",
        str(leaf_pem),
        "--oms-certificate",
        str(leaf),
        "--oms-certificate-chain",
        str(ca),
    )
    assert code == 0, err
    _require(monkeypatch, node=tmp_path, certificate_chains=ca)
    code, _, err = _predict(capsys, "iris:1")
    assert code == 0, err
    _require(monkeypatch, node=tmp_path, certificate_chains=rogue)
    code, _, err = _predict(capsys, "iris:1")
    assert code != 0
    assert "no trusted signer (certificate chain:" in err, err


def test_a_configured_but_optional_policy_treats_an_untrusted_signature_as_unsigned(
    store: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, pub = _keys(capsys, tmp_path / "signer")
    other_key, _ = _keys(capsys, tmp_path / "other")
    for _ in range(2):
        assert run_cli(capsys, "publish", str(model), "--name", "iris", "--format", "sklearn")[0] == 0
    assert run_cli(capsys, "sign", "iris:1", "--oms-key", str(key))[0] == 0
    assert run_cli(capsys, "sign", "iris:2", "--oms-key", str(other_key))[0] == 0
    repo = Repository(LocalStore(str(store)))
    settings = Settings(store=str(store), oms_public_keys=[pub])
    cache = LoaderCache(tmp_path / "check-cache", 1 << 30)
    signers = []
    for version in ("1", "2"):
        resolved, _ = cache.resolve(repo, ModelRef.parse(f"iris:{version}"))
        signers.append(check_trust(repo, resolved, settings, cache_root=cache.root).oms_signer)
    assert signers == [f"key {pub.name}", None]


def test_a_sigstore_identity_without_a_mounted_trust_root_is_refused_not_fetched(
    store: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, _ = _keys(capsys, tmp_path / "signer")
    assert run_cli(capsys, "publish", str(model), "--name", "iris", "--format", "sklearn")[0] == 0
    assert run_cli(capsys, "sign", "iris:1", "--oms-key", str(key))[0] == 0
    repo = Repository(LocalStore(str(store)))
    settings = Settings(
        store=str(store),
        require_oms_signature=True,
        oms_sigstore_identity="trainer@example.com",
        oms_sigstore_issuer="https://accounts.example.com",
    )
    cache = LoaderCache(tmp_path / "check-cache", 1 << 30)
    resolved, _ = cache.resolve(repo, ModelRef.parse("iris:1"))
    with pytest.raises(UntrustedArtifact, match="needs its OIDC issuer and a mounted trust root"):
        check_trust(repo, resolved, settings, cache_root=cache.root)


def test_a_key_that_is_not_an_ec_public_key_is_that_signers_failure_not_a_crash(
    store: Path,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An Ed25519 key (serving's own kind) in the same mounted folder as the EC key: the EC key still
    verifies, and a folder of only that key refuses with its reason, in one line."""
    key, pub = _keys(capsys, tmp_path / "signer")
    assert run_cli(capsys, "keygen", str(tmp_path / "release"))[0] == 0  # NOTE: Ed25519
    both = tmp_path / "keys"
    both.mkdir()
    for source in (pub, tmp_path / "release.pub"):
        (both / source.name).write_bytes(source.read_bytes())
    assert run_cli(capsys, "publish", str(model), "--name", "iris", "--format", "sklearn")[0] == 0
    assert run_cli(capsys, "sign", "iris:1", "--oms-key", str(key))[0] == 0
    _require(monkeypatch, node=tmp_path, public_keys=both)
    code, _, err = _predict(capsys, "iris:1")
    assert code == 0, err
    _require(monkeypatch, node=tmp_path, public_keys=tmp_path / "release.pub")
    code, _, err = _predict(capsys, "iris:1")
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert "key release.pub:" in err


@pytest.mark.parametrize(
    ("resources", "needle"),
    [
        ([{"name": "m.joblib", "algorithm": "sha256", "digest": "aa"}] * 2, "lists m.joblib twice"),
        ([{"name": "./m.joblib", "algorithm": "sha256", "digest": "aa"}], "not plainly"),
        ([{"name": "a/../m.joblib", "algorithm": "sha256", "digest": "aa"}], "not plainly"),
        ([{"name": "m.joblib", "algorithm": "blake2b", "digest": "aa"}], "other than sha256"),
    ],
)
def test_a_signed_statement_must_name_each_file_once_plainly_with_sha256(
    resources: list[dict[str, str]], needle: str
) -> None:
    """The library keeps one entry per name (the last): duplicates and odd spellings are checked
    on the statement itself, after the library verified its signature."""
    from serving.oms import _resources

    with pytest.raises(UntrustedArtifact, match=needle):
        _resources({"predicate": {"resources": resources}}, "iris:1", "key k.pub")


SIGSTORE_BUNDLE = Path(__file__).resolve().parents[1] / "data" / "oms" / "sigstore-model.sig"
SIGSTORE_IDENTITY = ("stefanb@us.ibm.com", "https://sigstore.verify.ibm.com/oauth2")


def _public_trust_config(tmp_path: Path) -> Path:
    """A ClientTrustConfig of Sigstore's public instance, from the trust root the sigstore package
    ships: what an operator mounts so that nothing is fetched at load."""
    import sigstore

    root = Path(sigstore.__file__).parent / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"
    config = {
        "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
        "trustedRoot": json.loads((root / "trusted_root.json").read_text()),
        "signingConfig": json.loads((root / "signing_config.v0.2.json").read_text()),
    }
    path = tmp_path / "trust-config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("identity", "allowed"),
    [(SIGSTORE_IDENTITY, True), (("someone@example.com", SIGSTORE_IDENTITY[1]), False)],
)
def test_a_sigstore_signed_model_verifies_offline_against_a_mounted_trust_root(
    store: Path, tmp_path: Path, identity: tuple[str, str], allowed: bool
) -> None:
    """A bundle Sigstore's public instance issued (tests/data/oms), checked with no network: the
    identity and issuer the policy names, or refused."""
    from serving.testing import publish_files

    repo = Repository(LocalStore(str(store)))
    files = {"signme-1": b"signme-1", "signme-2": b"signme-2"}
    publish_files(repo, tmp_path, "signed", "1", files, fmt="safetensors")  # NOTE: a safe class: no opt-in
    (store / "signed" / "versions" / "1" / "oms.sig").write_bytes(SIGSTORE_BUNDLE.read_bytes())
    settings = Settings(
        store=str(store),
        require_oms_signature=True,
        oms_sigstore_identity=identity[0],
        oms_sigstore_issuer=identity[1],
        oms_sigstore_trust_config=_public_trust_config(tmp_path),
    )
    cache = LoaderCache(tmp_path / "check-cache", 1 << 30)
    resolved, _ = cache.resolve(repo, ModelRef.parse("signed:1"))
    if allowed:
        trust = check_trust(repo, resolved, settings, cache_root=cache.root)
        assert trust.oms_signer == f"Sigstore identity {identity[0]}"
    else:
        with pytest.raises(UntrustedArtifact, match="no trusted signer"):
            check_trust(repo, resolved, settings, cache_root=cache.root)


def test_signing_with_a_key_that_is_not_ec_is_one_line(
    store: Path, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "keygen", str(tmp_path / "release"))[0] == 0  # NOTE: Ed25519, serving's own kind
    assert run_cli(capsys, "publish", str(model), "--name", "iris", "--format", "sklearn")[0] == 0
    code, _, err = run_cli(capsys, "sign", "iris:1", "--oms-key", str(tmp_path / "release.key"))
    assert code != 0
    assert err.count("\n") == 1, err
    assert "is not an EC key" in err
