"""Runs the real `loramerge serve` process (real vLLM engine, real model) for the tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from loramerge.v1 import inference_pb2

INFERENCE = "loramerge.v1.Inference"
START_TIMEOUT = 300.0


class WithKey(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Sends `authorization: Bearer <key>` with every call of a channel."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _with_key(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        metadata.append(("authorization", f"Bearer {self.key}"))
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._with_key(details), request)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._with_key(details), requests)


def create_key(config: Path, *args: str) -> str:
    """`loramerge keys create ARGS` against the store of `config`; the new key."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loramerge.server",
            "keys",
            "--config",
            str(config),
            "create",
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A `loramerge serve` subprocess on free local ports, with its own config and state."""

    workdir: Path
    settings: dict[str, object]
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    api_key: str | None = None  # sent by `channel()` and the start-up probe
    startup: list[tuple[float, str]] = field(default_factory=list)  # (seconds, observation)
    start_timeout: float = START_TIMEOUT  # seconds until every service must be SERVING
    shm_at_start: set[str] = field(default_factory=set)  # /dev/shm entries before the start

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible endpoint (…/v1)."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def write_config(self) -> Path:
        config = dict(self.settings)
        config["grpc"] = {**dict(config.get("grpc", {})), "port": self.grpc_port}  # type: ignore[arg-type]
        config["metrics"] = {**dict(config.get("metrics", {})), "port": self.metrics_port}  # type: ignore[arg-type]
        config["http"] = {**dict(config.get("http", {})), "port": self.http_port}  # type: ignore[arg-type]
        path = self.workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def channel(self, key: str | None = None) -> grpc.Channel:
        """A channel to the server sending `key` (default: `api_key`, if any) with every call."""
        channel = grpc.insecure_channel(self.address)
        key = key or self.api_key
        return grpc.intercept_channel(channel, WithKey(key)) if key else channel

    def start(self) -> None:
        """Start the server and wait until every service is SERVING, recording what health and
        Generate answered while the engine was still starting."""
        config = self.write_config()
        self.shm_at_start = _shm_entries()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loramerge.server", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group, as under a supervisor
        )
        self.startup = []
        began = time.monotonic()
        with self.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            generate = channel.unary_unary(
                "/loramerge.v1.Inference/Generate",
                request_serializer=inference_pb2.GenerateRequest.SerializeToString,
                response_deserializer=inference_pb2.GenerateResponse.FromString,
            )
            while time.monotonic() - began < self.start_timeout:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited early; log:\n{self.log_tail()}")
                try:
                    status = health.Check(
                        health_pb2.HealthCheckRequest(service=INFERENCE), timeout=2
                    ).status
                except grpc.RpcError:
                    time.sleep(0.5)
                    continue
                seconds = round(time.monotonic() - began, 1)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    self.startup.append((seconds, "SERVING"))
                    return
                self.startup.append((seconds, "NOT_SERVING"))
                try:
                    generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=1), timeout=5)
                    self.startup.append((seconds, "Generate OK"))
                except grpc.RpcError as error:
                    self.startup.append((seconds, f"Generate {error.code().name}"))
                time.sleep(1)
        raise RuntimeError(
            f"server not SERVING after {self.start_timeout} s; log:\n{self.log_tail()}"
        )

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the server's whole process group (vLLM's engine core included), as
        Ctrl-C in a terminal or a container runtime's kill does."""
        assert self.process is not None
        os.killpg(self.process.pid, sig)

    def wait(self, timeout: float) -> int:
        """Wait for the server to exit on its own; returns the exit code."""
        assert self.process is not None
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def group_alive(self, pgid: int) -> list[int]:
        """Processes still alive in process group `pgid`."""
        return [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _pgid(int(p.name)) == pgid
        ]

    @property
    def run_dirs(self) -> list[Path]:
        export_dir = Path(str(self.settings["merge"]["export_dir"]))  # type: ignore[index]
        return sorted(export_dir.glob("run-*")) if export_dir.exists() else []

    def sweep_shm(self) -> list[str]:
        """After a kill -9, delete the /dev/shm segments vLLM made since the start that no live
        process maps any more (its shared-memory queues, which a killed process cannot unlink);
        returns their names."""
        mapped = _mapped_paths()
        orphans = [
            name
            for name in sorted(_shm_entries() - self.shm_at_start)
            if name.startswith(("psm_", "sem.mp-")) and str(SHM / name) not in mapped
        ]
        for name in orphans:
            (SHM / name).unlink(missing_ok=True)
        return orphans

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def cleanup(self) -> None:
        if self.process is not None:
            pgid = self.process.pid
            self.stop()
            for pid in self.group_alive(pgid):  # never leave an orphaned engine core
                os.kill(pid, signal.SIGKILL)
        export_dir = Path(str(self.settings["merge"]["export_dir"]))  # type: ignore[index]
        shutil.rmtree(export_dir, ignore_errors=True)


SHM = Path("/dev/shm")


def _shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


def _mapped_paths() -> set[str]:
    """The files live processes map (the last field of /proc/PID/maps lines)."""
    paths: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended meanwhile
            continue
        for line in text.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                paths.add(fields[5])
    return paths


def _pgid(pid: int) -> int | None:
    """The process group of a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return None
        return os.getpgid(pid)
    except (OSError, IndexError):
        return None


def gauges(server: ServerProcess) -> dict[str, float]:
    """Gauge values by `name{labels}` (and by plain name, summed)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(0.25)
