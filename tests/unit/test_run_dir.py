"""Run directories: only the directories of dead runs are swept at start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loramerge.server.run_dir import OWNER_FILE, create_run_dir, current_owner, sweep_dead_runs


def test_only_dead_runs_are_swept(tmp_path: Path) -> None:
    mine = create_run_dir(tmp_path)
    assert json.loads((mine / OWNER_FILE).read_text())["pid"] == current_owner().pid
    (mine / "m1-abc").mkdir()

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = create_fake(tmp_path, "run-alive", child.pid)
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True, check=True).stdout  # fmt: skip
        dead = create_fake(tmp_path, "run-dead", int(dead_pid))
        reused = create_fake(tmp_path, "run-reused", child.pid, start_ticks=1)  # pid recycled
        other_boot = create_fake(tmp_path, "run-boot", child.pid, boot_id="another-boot")
        no_owner = tmp_path / "run-legacy"
        no_owner.mkdir()
        staging = tmp_path / ".run-x.tmp"
        staging.mkdir()
        unrelated = tmp_path / "keep-me"
        unrelated.mkdir()

        swept = sweep_dead_runs(tmp_path)

        assert set(swept) == {dead, reused, other_boot, no_owner, staging}
        assert mine.is_dir() and (mine / "m1-abc").is_dir() and alive.is_dir()
        assert unrelated.is_dir()
    finally:
        child.kill()
        child.wait()
    assert sweep_dead_runs(tmp_path) == [alive]  # its owner has exited now
    assert sweep_dead_runs(tmp_path / "missing") == []


def create_fake(
    root: Path, name: str, pid: int, *, start_ticks: int | None = None, boot_id: str | None = None
) -> Path:
    owner = current_owner()
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}").exists() else ""
    ticks = int(stat.rsplit(")", 1)[1].split()[19]) if stat else 0
    path = root / name
    path.mkdir()
    record = {
        "boot_id": boot_id or owner.boot_id,
        "pid": pid,
        "start_ticks": ticks if start_ticks is None else start_ticks,
    }
    (path / OWNER_FILE).write_text(json.dumps(record))
    return path
