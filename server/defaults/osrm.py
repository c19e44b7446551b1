"""The default pool trained from OSRM's A-initialisation (`loramerge prepare --osrm`).

Each default task's adapter is trained exactly as the standard one (`train.RECIPE`, same steps,
examples and seed) except that its A factors start at OSRM's Ã: the eigenvectors of the other
tasks' input second moment with the smallest eigenvalues (`merge_engine.osrm`), computed from
the standard adapters' input statistics (the base model's features on each task's calibration
prompts and that task's adapter's answers). The adapters go to `<cache>/adapters-osrm/<task>`
(`adapters-osrm-mean` for the paper's mean-row variant); the standard pool is only read. Each
folder also gets `osrm.json` (the init's and the trained adapter's interference with the other
tasks, and how far A moved) and, like the standard pool (`calibration.ensure_calibration`), the
task's calibration prompts and its OWN input statistics (with its own answers), so that RegMean
can merge the pool.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from transformers import AutoTokenizer

from loramerge.merge_engine import STATISTICS_FILE, InputStatistics, load_adapter
from loramerge.merge_engine.osrm import Features, Weighting, diagnose, osrm_basis

from .cache import build_atomically, is_built
from .calibration import ensure_calibration
from .errors import DefaultAssetsError
from .tasks import TASKS
from .train import ADAPTER_FILES, RECIPE, _load_base, _train

SUMMARY_FILE = "osrm.json"


def osrm_adapters_dir(cache_dir: Path, features: Features = "moment") -> Path:
    """Where `ensure_osrm_adapters` keeps the pool, one folder per task name."""
    return cache_dir / ("adapters-osrm" if features == "moment" else "adapters-osrm-mean")


def ensure_osrm_adapters(
    model_dir: Path,
    cache_dir: Path,
    standard: Mapping[str, Path],
    *,
    features: Features = "moment",
    weighting: Weighting = "task",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Return {task name: adapter folder} of the OSRM-initialised pool, training the missing
    adapters. `standard` is the prepared standard pool (task → folder with input statistics)."""
    emit = progress or (lambda _line: None)
    root = osrm_adapters_dir(cache_dir, features)
    folders = {task.name: root / task.name for task in TASKS}
    missing = [task for task in TASKS if not is_built(folders[task.name], ADAPTER_FILES)]
    if not missing:
        return folders
    statistics = _statistics(standard)
    reference = load_adapter(standard[TASKS[0].name], TASKS[0].name)
    ranks = dict.fromkeys(reference.modules, RECIPE.rank)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for task in missing:
        started = time.monotonic()
        emit(f"OSRM init of {task.name}: the other tasks' input statistics, per module ...")
        basis = osrm_basis(statistics, task.name, ranks, features=features, weighting=weighting)
        emit(f"training OSRM adapter {task.name} ({task.train_steps} steps) ...")
        with build_atomically(folders[task.name]) as staging:
            loss = _train(_load_base(model_dir), tokenizer, task, staging, lora_a=basis.a)
            trained = load_adapter(staging, task.name)
            summary = {
                "features": features,
                "weighting": weighting,
                "steps": task.train_steps,
                "final_loss": loss,
                **diagnose(
                    trained.modules, statistics, task.name, init=basis.a, weighting=weighting
                ),
            }
            (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        emit(
            f"training OSRM adapter {task.name}: final loss {loss:.3f}, interference "
            f"{summary['interference_init']:.3f} at init → {summary['interference']:.3f}, "
            f"A moved {100 * summary['procrustes']:.0f}% (Procrustes), "
            f"{time.monotonic() - started:.1f} s"
        )
    ensure_calibration(model_dir, folders, progress)
    return folders


def _statistics(standard: Mapping[str, Path]) -> dict[str, InputStatistics]:
    out = {}
    for task in TASKS:
        folder = standard.get(task.name)
        if folder is None:
            raise DefaultAssetsError(f"the standard pool has no adapter {task.name!r}")
        statistics = load_adapter(folder, task.name).statistics
        if statistics is None:
            raise DefaultAssetsError(
                f"{folder / STATISTICS_FILE}: missing; OSRM's init needs every default "
                "adapter's input statistics (run `loramerge prepare` first)"
            )
        out[task.name] = statistics
    return out
