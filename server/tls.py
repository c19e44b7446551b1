"""TLS and mutual TLS for the gRPC port, reloaded from the files when they change.

gRPC asks `CertificateFiles.fetch` before each new handshake; it returns a new configuration
when a file's modification time or size changed (cert-manager and Kubernetes secret volumes
replace the files in place), else None to keep the current one. A renewal in progress (files
unreadable, or a key that does not match yet) keeps the previous configuration and logs why;
connections already open keep theirs.
"""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path

import grpc

from .config import TlsSettings
from .errors import ConfigError

logger = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int], ...]


class CertificateFiles:
    """The PEM files of `TlsSettings`, read at start (errors are `ConfigError`) and on change."""

    def __init__(self, settings: TlsSettings) -> None:
        assert settings.cert_file is not None and settings.key_file is not None
        self._files = [settings.cert_file, settings.key_file]
        if settings.client_ca_file is not None:
            self._files.append(settings.client_ca_file)
        self.mutual = settings.client_ca_file is not None
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.initial = self._read()

    def _stat(self) -> _Stamp:
        stamps = []
        for path in self._files:
            try:
                info = path.stat()
            except OSError as err:
                raise ConfigError(f"cannot read {path}: {err.strerror}", "tls") from None
            stamps.append((info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        contents: list[bytes] = []
        for path in self._files:
            try:
                contents.append(Path(path).read_bytes())
            except OSError as err:
                raise ConfigError(f"cannot read {path}: {err.strerror}", "tls") from None
        for path, data in zip(self._files, contents, strict=True):
            if b"-----BEGIN " not in data:
                raise ConfigError(f"{path} is not a PEM file", "tls")
        try:  # a key that does not belong to the certificate would fail every handshake
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(self._files[0]), str(self._files[1])
            )
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(
                f"{self._files[0]} and {self._files[1]} are not a certificate and its key: {err}",
                "tls",
            ) from None
        cert, key = contents[0], contents[1]
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=contents[2] if self.mutual else None
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration if the files changed since the last read, else None."""
        with self._lock:
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                configuration = self._read()
            except ConfigError as err:
                logger.warning("TLS files changed but cannot be used yet: %s", err)
                return None
            self._stamp = stamp
            logger.info(
                "TLS certificate files reloaded", extra={"files": [str(f) for f in self._files]}
            )
            return configuration


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials:
    """Credentials for `server.add_secure_port`: TLS, or mTLS when a client CA is configured."""
    files = CertificateFiles(settings)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=files.mutual
    )
