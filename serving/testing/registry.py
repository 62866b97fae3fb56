"""A real OCI registry for tests: Debian's ``docker-registry`` (CNCF Distribution 2.8) on loopback.

It stores under a temporary folder, allows deletes, and can ask for htpasswd
(basic) auth and serve HTTPS with a certificate signed by a CA made for the run.

Example:
    >>> binary = find_registry()  # doctest: +SKIP
    >>> with run_registry(binary, work, auth=("alice", "s3cret"), tls=True) as reg:  # doctest: +SKIP
    ...     with reg.client() as client:
    ...         client.get(f"{reg.url}/v2/").status_code
    200
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import datetime
import importlib
import ipaddress
import os
import secrets
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from serving.testing.poll import wait_for
from serving.testing.process import stop_process
from serving.testing.s3 import free_port

__all__ = ["Registry", "bcrypt_hash", "find_registry", "run_registry"]

HOST = "127.0.0.1"
BCRYPT_COST = 5
"""Low on purpose: the registry checks the hash on every request (Go's bcrypt accepts 4 and up)."""


def find_registry() -> str | None:
    """``$DOCKER_REGISTRY``, else ``docker-registry`` on the PATH (``apt-get install docker-registry``)."""
    return os.environ.get("DOCKER_REGISTRY") or shutil.which("docker-registry")


@dataclass
class Registry:
    """A running registry: where it listens, how to authenticate, and where it keeps things."""

    host: str
    """``127.0.0.1:PORT``."""
    scheme: str
    """``http``, or ``https`` with ``tls=True``."""
    username: str | None
    password: str | None
    ca_path: Path | None
    """The PEM of the CA that signed the server certificate (``tls=True``), else None."""
    root: Path
    """The storage driver's root directory."""
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        """``scheme://host``."""
        return f"{self.scheme}://{self.host}"

    @property
    def auth(self) -> tuple[str, str] | None:
        """The basic-auth credentials, or None without auth."""
        if self.username is None or self.password is None:
            return None
        return (self.username, self.password)

    def verify(self) -> ssl.SSLContext | bool:
        """What ``httpx``'s ``verify=`` needs: a context that trusts only ``ca_path``, or True."""
        return ssl.create_default_context(cafile=str(self.ca_path)) if self.ca_path else True

    def client(self, **kwargs: Any) -> httpx.Client:
        """An ``httpx.Client`` for ``url`` that verifies against the CA and sends the credentials."""
        kwargs.setdefault("timeout", 10)
        return httpx.Client(base_url=self.url, auth=self.auth, verify=self.verify(), **kwargs)


# --- bcrypt for the htpasswd file ---------------------------------------------------------------

_CRYPT_LOCK = threading.Lock()  # NOTE: crypt(3) returns a static buffer


def _libcrypt_bcrypt(password: bytes, setting: bytes) -> str | None:
    """bcrypt through the C library's crypt(3) (libxcrypt does ``$2a$``/``$2b$``/``$2y$``), or None."""
    name = ctypes.util.find_library("crypt")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    crypt = lib.crypt
    crypt.restype = ctypes.c_char_p
    crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    with _CRYPT_LOCK:
        out: bytes | None = crypt(password, setting)
    # NOTE: a libcrypt without bcrypt answers NULL or a failure token ("*0"), never the setting
    if out is None or not out.startswith(setting[:29]) or len(out) != 60:
        return None
    return out.decode()


def _htpasswd_bcrypt(password: str) -> str | None:
    """bcrypt through Apache's ``htpasswd -nbB`` if it is on the PATH, or None."""
    binary = shutil.which("htpasswd")
    if binary is None:
        return None
    cmd = [binary, "-nbBC", str(BCRYPT_COST), "user", password]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip().partition(":")[2] or None


def bcrypt_hash(password: str, setting: str | None = None) -> str:
    """The bcrypt hash of ``password``, as an htpasswd file holds it (``$2y$05$...``, 60 characters).

    ``setting`` is the ``$2?$NN$`` prefix and 22-character salt; a random salt by default.
    Tries the ``bcrypt`` package, then the C library's crypt(3), then ``htpasswd``.
    """
    if setting is None:
        salt = base64.b64encode(secrets.token_bytes(16)).decode()[:22]
        # NOTE: bcrypt's base64 is the standard one with "./" first instead of "+/" last
        salt = salt.translate(str.maketrans(_B64, _BCRYPT64))
        setting = f"$2y${BCRYPT_COST:02d}${salt}"
    with contextlib.suppress(ImportError):
        bcrypt = importlib.import_module("bcrypt")
        hashed: bytes = bcrypt.hashpw(password.encode(), setting.encode())
        return hashed.decode()
    found = _libcrypt_bcrypt(password.encode(), setting.encode())
    if found is None and setting.startswith(f"$2y${BCRYPT_COST:02d}$"):
        found = _htpasswd_bcrypt(password)  # NOTE: its own salt; only when none was asked for
    if found is None:
        raise RuntimeError("no bcrypt: install the bcrypt package, apache2-utils, or libxcrypt")
    return found


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BCRYPT64 = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


# --- TLS ------------------------------------------------------------------------------------------


def _write_certs(work: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost that it signed: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serving test registry CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(HOST)),
        x509.DNSName("localhost"),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    tls = work / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = tls / "ca.pem", tls / "server.pem", tls / "server-key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


# --- the server -----------------------------------------------------------------------------------


@contextlib.contextmanager
def run_registry(
    binary: str, work: Path, *, auth: tuple[str, str] | None = None, tls: bool = False
) -> Iterator[Registry]:
    """Start the registry on a free loopback port, storing under ``work``; stop it on exit.

    ``auth=(user, password)`` turns on htpasswd (basic) auth; ``tls=True`` serves HTTPS with
    a certificate for 127.0.0.1 and localhost, signed by a CA whose PEM is ``Registry.ca_path``.
    """
    work.mkdir(parents=True, exist_ok=True)
    root = work / "storage"
    root.mkdir(exist_ok=True)
    host = f"{HOST}:{free_port()}"
    http: dict[str, Any] = {
        "addr": host,
        "secret": secrets.token_hex(32),
        "headers": {"X-Content-Type-Options": ["nosniff"]},
    }
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
        "http": http,
    }
    ca_path: Path | None = None
    if tls:
        ca_path, cert_path, key_path = _write_certs(work)
        http["tls"] = {"certificate": str(cert_path), "key": str(key_path)}
    if auth is not None:
        user, password = auth
        htpasswd = work / "htpasswd"
        htpasswd.write_text(f"{user}:{bcrypt_hash(password)}\n")
        config["auth"] = {"htpasswd": {"realm": "serving-test-registry", "path": str(htpasswd)}}
    config_path = work / "registry.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = work / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "serve", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    registry = Registry(
        host=host,
        scheme="https" if tls else "http",
        username=auth[0] if auth else None,
        password=auth[1] if auth else None,
        ca_path=ca_path,
        root=root,
        process=process,
        log=log,
    )
    try:
        expected = 401 if auth is not None else 200
        verify = registry.verify()

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"docker-registry exited {process.returncode}: {log.read_text(errors='replace')[-2000:]}"
                )
            status = httpx.get(f"{registry.url}/v2/", verify=verify, timeout=2).status_code
            if status != expected:  # NOTE: it listens only once it is ready, so this is a wrong config
                raise AssertionError(f"GET {registry.url}/v2/ answered {status}, not {expected}")
            return True

        wait_for(ready, timeout=30.0, what=f"docker-registry on {registry.url}")
        yield registry
    finally:
        stop_process(process)
