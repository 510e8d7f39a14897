"""HTTPS: verification against a CA bundle, and a proxy that will not open a tunnel."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.client_app.conftest import clean_environment, client_app
from tests.client_app.fakes import FakeProxy


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello over tls\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def https_site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cert, key = self_signed(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/", cert
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_an_unknown_ca_is_one_line_and_ca_bundle_fixes_it(https_site: tuple[str, Path]) -> None:
    url, cert = https_site
    refused = client_app("fetch", url)
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        f"client-app: TLS verification failed for {url}: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
        "failed: self-signed certificate — a proxy"
    )
    assert refused.stderr.rstrip().endswith(
        "pass --ca-bundle ~/.mitmproxy/mitmproxy-ca-cert.pem or set REQUESTS_CA_BUNDLE"
    )
    assert refused.stderr.count("\n") == 1
    trusted = client_app("fetch", url, "--ca-bundle", str(cert), "--body")
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.startswith(f"GET {url} → 200 OK in ")
    assert trusted.stdout.endswith("\nhello over tls\n")
    via_environment = client_app("fetch", url, env=clean_environment(REQUESTS_CA_BUNDLE=str(cert)))
    assert via_environment.returncode == 0, via_environment.stderr


def test_a_proxy_that_refuses_the_tunnel(proxy: FakeProxy, https_site: tuple[str, Path]) -> None:
    url, cert = https_site
    result = client_app("fetch", url, "--ca-bundle", str(cert), env=clean_environment(HTTPS_PROXY=proxy.url))
    assert result.returncode == 1
    host = url.removeprefix("https://").rstrip("/")
    assert proxy.seen == [f"CONNECT {host}"]
    assert result.stderr == (
        f"client-app: the proxy at {proxy.url} would not open a tunnel to https://{host}: "
        "Tunnel connection failed: 403 Forbidden\n"
    )
