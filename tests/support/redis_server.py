"""The one redis-server wrapper of the test suites: ``worker.demo.local.LocalRedis`` (loopback,
a free port, password and AOF options, stopped by its pid) plus TLS only (a CA and a server
certificate made here), ``restart()`` on the same port and directory, and its log's tail.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.demo.local import LOOPBACK, LocalRedis


@dataclass
class RedisServer(LocalRedis):
    """A ``LocalRedis`` for tests. ``tls=True``: reachable only over TLS (``--port 0``; clients
    need no certificate of their own, and ``url`` makes Celery's broker, its result backend and
    redis-py verify the server against ``ca``)."""

    tls: bool = False
    ca: Path | None = None
    _cert: Path | None = None
    _key: Path | None = None

    def db_url(self, db: int) -> str:
        """The URL of database ``db``, password included; over TLS, with the query parameters
        kombu, Celery's result backend and redis-py all read."""
        if not self.tls:
            return super().db_url(db)
        auth = f":{self.password}@" if self.password else ""
        return f"rediss://{auth}{LOOPBACK}:{self.port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"

    def listen_args(self) -> list[str]:
        if not self.tls:
            return super().listen_args()
        if self.ca is None:
            self.ca, self._cert, self._key = make_certificates(self.workdir / "tls")
        args = ["--port", "0", "--tls-port", str(self.port), "--bind", LOOPBACK, "--tls-auth-clients", "no"]
        return [
            *args,
            "--tls-cert-file",
            str(self._cert),
            "--tls-key-file",
            str(self._key),
            "--tls-ca-cert-file",
            str(self.ca),
        ]

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING (see ``LocalRedis.start``)."""
        super().start(timeout_s)
        return self

    def restart(self) -> float:
        """Stop the server (SIGTERM: it writes its AOF) and start it again on the same port and
        directory; return how long it was away."""
        went_away = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - went_away

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key = directory / "server.pem", directory / "server.key"
    openssl = shutil.which("openssl")
    if openssl is not None:
        ext = directory / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
        csr = directory / "server.csr"

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

        new_key = ("-newkey", "rsa:2048", "-nodes")
        run(
            "req",
            "-x509",
            *new_key,
            "-days",
            "2",
            "-subj",
            "/CN=cascade-test-ca",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca),
        )
        run("req", *new_key, "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
        signed_by_ca = ("-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial")
        run("x509", "-req", "-in", str(csr), *signed_by_ca, "-days", "2", "-extfile", str(ext), "-out", str(cert))
        return ca, cert, key
    return _make_certificates_with_cryptography(ca, ca_key, cert, key)


def _make_certificates_with_cryptography(ca: Path, ca_key: Path, cert: Path, key: Path) -> tuple[Path, Path, Path]:
    import datetime
    import ipaddress

    import pytest

    x509 = pytest.importorskip("cryptography.x509", reason="neither the openssl CLI nor cryptography is available")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def pem_key(private: Any) -> bytes:
        return bytes(
            private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            )
        )

    authority_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    authority = (
        x509.CertificateBuilder()
        .subject_name(name("cascade-test-ca"))
        .issuer_name(name("cascade-test-ca"))
        .public_key(authority_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(authority_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")])
    server = (
        x509.CertificateBuilder()
        .subject_name(name(LOOPBACK))
        .issuer_name(authority.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(san, critical=False)
        .sign(authority_key, hashes.SHA256())
    )
    ca.write_bytes(authority.public_bytes(serialization.Encoding.PEM))
    ca_key.write_bytes(pem_key(authority_key))
    cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pem_key(server_key))
    return ca, cert, key
