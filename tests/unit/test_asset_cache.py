"""Building cached folders atomically: what a killed builder leaves behind is swept."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from loramerge.server.defaults.cache import build_atomically

BUILDER = """
import sys, time
from pathlib import Path
from loramerge.server.defaults.cache import build_atomically
with build_atomically(Path(sys.argv[1])) as staging:
    (staging / "half.bin").write_bytes(b"x" * 1000)
    print(staging, flush=True)
    time.sleep(600)
"""


def start_builder(folder: Path) -> tuple[subprocess.Popen[str], Path]:
    """A real process half-way through building `folder`; returns it and its staging folder."""
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert builder.stdout is not None
    staging = Path(builder.stdout.readline().strip())
    assert staging.is_dir() and staging.parent == folder.parent
    return builder, staging


def test_a_killed_builders_staging_folder_is_swept_by_the_next_build(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    builder, orphan = start_builder(folder)
    builder.send_signal(signal.SIGKILL)
    builder.wait(timeout=30)
    assert orphan.is_dir()  # kill -9: nothing could clean up

    with build_atomically(folder) as staging:
        (staging / "done.bin").write_bytes(b"ok")
    assert not orphan.exists()
    assert (folder / "done.bin").read_bytes() == b"ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_live_builders_staging_folder_is_kept(tmp_path: Path) -> None:
    builder, staging = start_builder(tmp_path / "adapter")
    try:
        with build_atomically(tmp_path / "adapter") as ours:
            (ours / "done.bin").write_bytes(b"ok")
        time.sleep(0.1)
        assert (staging / "half.bin").is_file()  # still being built by a running process
    finally:
        builder.kill()
        builder.wait(timeout=30)


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    try:
        with build_atomically(folder) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("the build failed")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
