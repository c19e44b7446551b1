"""TLS and mTLS on a real gRPC server with certificates made here: clients that trust the CA
connect, others do not; client certificates when a client CA is set; files reloaded on change."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loramerge.server.config import TlsSettings
from loramerge.server.errors import ConfigError
from loramerge.server.tls import server_credentials


@dataclass
class Issued:
    cert: bytes
    key: bytes


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(common: str) -> tuple[Issued, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)), key, cert


def issue(ca: tuple[Issued, ec.EllipticCurvePrivateKey, x509.Certificate], common: str) -> Issued:
    _, ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


@pytest.fixture(scope="module")
def ca() -> tuple[Issued, ec.EllipticCurvePrivateKey, x509.Certificate]:
    return make_ca("loramerge test CA")


@pytest.fixture(scope="module")
def other_ca() -> tuple[Issued, ec.EllipticCurvePrivateKey, x509.Certificate]:
    return make_ca("someone else's CA")


def write(directory: Path, server: Issued, client_ca: Issued | None) -> TlsSettings:
    (directory / "tls.crt").write_bytes(server.cert)
    (directory / "tls.key").write_bytes(server.key)
    if client_ca is not None:
        (directory / "ca.crt").write_bytes(client_ca.cert)
    return TlsSettings(
        cert_file=directory / "tls.crt",
        key_file=directory / "tls.key",
        client_ca_file=directory / "ca.crt" if client_ca is not None else None,
    )


@pytest.fixture
def serve() -> Iterator[object]:
    servers: list[grpc.Server] = []

    def start(settings: TlsSettings) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(settings))
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(0)


def check(port: int, trusted: Issued, client: Issued | None = None) -> grpc.StatusCode:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trusted.cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_tls_trusted_client_connects_others_do_not(
    tmp_path: Path, serve: object, ca: tuple, other_ca: tuple
) -> None:
    port = serve(write(tmp_path, issue(ca, "server"), None))  # type: ignore[operator]
    assert check(port, ca[0]) == grpc.StatusCode.OK
    assert check(port, other_ca[0]) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"localhost:{port}") as channel:  # plain text is refused
        with pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_client_ca(
    tmp_path: Path, serve: object, ca: tuple, other_ca: tuple
) -> None:
    port = serve(write(tmp_path, issue(ca, "server"), ca[0]))  # type: ignore[operator]
    assert check(port, ca[0], issue(ca, "client")) == grpc.StatusCode.OK
    assert check(port, ca[0]) == grpc.StatusCode.UNAVAILABLE
    assert check(port, ca[0], issue(other_ca, "intruder")) == grpc.StatusCode.UNAVAILABLE


def test_replaced_files_are_used_for_new_connections(
    tmp_path: Path, serve: object, ca: tuple, other_ca: tuple
) -> None:
    settings = write(tmp_path, issue(ca, "server"), None)
    port = serve(settings)  # type: ignore[operator]
    assert check(port, ca[0]) == grpc.StatusCode.OK
    renewed = issue(other_ca, "server, renewed")
    for path, data in ((settings.key_file, renewed.key), (settings.cert_file, renewed.cert)):
        assert path is not None
        path.write_bytes(data)
        os.utime(path, ns=(1, 1))  # a different mtime even within the clock's resolution
    assert check(port, other_ca[0]) == grpc.StatusCode.OK
    assert check(port, ca[0]) == grpc.StatusCode.UNAVAILABLE


def test_a_half_written_renewal_keeps_the_current_certificate(
    tmp_path: Path, serve: object, ca: tuple, other_ca: tuple
) -> None:
    settings = write(tmp_path, issue(ca, "server"), None)
    port = serve(settings)  # type: ignore[operator]
    assert settings.cert_file is not None
    settings.cert_file.write_bytes(issue(other_ca, "not matching the key").cert)
    assert check(port, ca[0]) == grpc.StatusCode.OK


def test_bad_files_fail_at_start(tmp_path: Path, ca: tuple) -> None:
    settings = write(tmp_path, issue(ca, "server"), None)
    assert settings.key_file is not None
    settings.key_file.write_bytes(issue(ca, "another").key)
    with pytest.raises(ConfigError, match="not a certificate and its key"):
        server_credentials(settings)
    settings.key_file.write_text("not pem")
    with pytest.raises(ConfigError, match="not a PEM file"):
        server_credentials(settings)
    with pytest.raises(ConfigError, match="cannot read"):
        server_credentials(TlsSettings(cert_file=tmp_path / "none", key_file=tmp_path / "none"))
