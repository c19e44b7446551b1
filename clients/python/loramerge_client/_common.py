"""What Client and AsyncClient share: TLS and retry settings, metadata, export writing."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc

from .errors import InvalidArgument
from .v1 import merges_pb2

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 120.0  # seconds; a first request for a new blend includes its merge
VERSION = "0.1.0"


@dataclass(frozen=True)
class TLS:
    """TLS to the server: `ca` verifies it (None: the system roots); `cert` and `key` are a
    client certificate for mutual TLS; `server_name` overrides the name checked in its
    certificate. Paths to PEM files."""

    ca: str | os.PathLike[str] | None = None
    cert: str | os.PathLike[str] | None = None
    key: str | os.PathLike[str] | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: give both cert and key for mutual TLS, or neither")

        def read(path: str | os.PathLike[str] | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


@dataclass(frozen=True)
class Retry:
    """Retries of calls that are safe to repeat (reads, merges, exports before any data, and
    generation before any token arrived) on the listed codes, with exponential backoff and
    jitter, within the call's deadline. `attempts` counts the first try; 1 disables retries."""

    attempts: int = 4
    initial_backoff: float = 0.25
    max_backoff: float = 4.0
    multiplier: float = 2.0
    codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def delay(self, attempt: int, code: grpc.StatusCode, deadline: float) -> float | None:
        """Seconds to wait before retry `attempt` (1, 2, ...) after `code`; None: give up."""
        if attempt >= self.attempts or code not in self.codes:
            return None
        wait = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        wait *= random.uniform(0.5, 1.0)
        return wait if time.monotonic() + wait < deadline else None


def channel_options(tls: TLS | None) -> list[tuple[str, str | int]]:
    options: list[tuple[str, str | int]] = [
        ("grpc.primary_user_agent", f"loramerge-client/{VERSION}")
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def metadata(token: str | None, tenant_id: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata: the bearer token, and the tenant (proxies route a tenant to one replica)."""
    pairs = []
    if token:
        pairs.append(("authorization", f"Bearer {token}"))
    if tenant_id:
        pairs.append(("x-tenant-id", tenant_id))
    return tuple(pairs)


class ExportWriter:
    """Writes an Export stream into a new directory, all or nothing: files land in a scratch
    directory beside `out_dir`, each checked against its size and SHA-256, which is renamed to
    `out_dir` only when the stream ended complete."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise FileExistsError(f"{self.out_dir} exists and is not an empty directory")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._scratch = Path(
            tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", dir=self.out_dir.parent)
        )
        self.adapter_id = ""
        self._header: merges_pb2.FileHeader | None = None
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._size = 0

    def feed(self, response: merges_pb2.ExportResponse) -> None:
        if response.WhichOneof("part") == "file":
            self._close_file()
            header = response.file
            if not header.name or Path(header.name).name != header.name or header.name[0] == ".":
                raise InvalidArgument(f"the server sent an unsafe file name {header.name!r}")
            self._header, self.adapter_id = header, header.adapter_id
            self._file = (self._scratch / header.name).open("wb")
            self._hash, self._size = hashlib.sha256(), 0
        else:
            if self._file is None:
                raise InvalidArgument("the export stream sent data before a file header")
            self._file.write(response.chunk)
            self._hash.update(response.chunk)
            self._size += len(response.chunk)

    def _close_file(self) -> None:
        if self._header is None or self._file is None:
            return
        self._file.close()
        header, self._header, self._file = self._header, None, None
        if self._size != header.size or self._hash.hexdigest() != header.sha256:
            raise InvalidArgument(f"{header.name}: size or SHA-256 does not match its header")

    def finish(self) -> Path:
        self._close_file()
        if not any(self._scratch.iterdir()):
            raise InvalidArgument("the export stream contained no files")
        if self.out_dir.exists():
            self.out_dir.rmdir()  # empty, checked above
        self._scratch.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        shutil.rmtree(self._scratch, ignore_errors=True)
