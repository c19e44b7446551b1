"""A real, throwaway PostgreSQL server for the tests (the `postgres` fixture: one a session)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg


def _postgres_bin() -> Path:
    """The directory of the PostgreSQL server programs (Debian keeps them off the PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        raise RuntimeError("no PostgreSQL server: install it (`make system-deps`)")
    return Path(pg_ctl).parent


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL server: its own data directory, 127.0.0.1 on a free port, trust
    authentication, run as an unprivileged user (PostgreSQL refuses to run as root)."""

    root: Path
    port: int
    user: str | None  # the account to run as when we are root

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        bin_dir = _postgres_bin()
        data = self.root / "data"
        self._run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C.UTF-8")  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-w",
                  "-l", str(self.root / "server.log"), "start")  # fmt: skip

    def stop(self) -> None:
        self._run(str(_postgres_bin() / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast",
                  "-w", "stop")  # fmt: skip

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL. Its default collation is ICU's en-US, as in
        many real deployments, where text order is not byte order ('a' < 'B')."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'"
                " LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        return self.url(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_postgres(root: Path) -> PostgresServer:
    """Start a server in `root` (an empty directory), as the `postgres` account when we are
    root, since PostgreSQL refuses to run as root."""
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            user = "nobody"
        account = pwd.getpwnam(user)
        os.chown(root, account.pw_uid, account.pw_gid)
    server = PostgresServer(root, _free_port(), user)
    server.start()
    return server
