"""Each default adapter's calibration data: unlabeled task prompts and the input statistics.

`calibration_prompts.jsonl` (one `{"prompt": ...}` per line, `CALIBRATION_PROMPTS` prompts of
the adapter's task drawn with `CALIBRATION_SEED`) and `input_statistics.safetensors` (what the
base model's adapted layers read on them) are added to each default adapter's folder when
missing: a cache prepared by an older release gains them without retraining anything.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from loramerge.merge_engine import STATISTICS_FILE, load_adapter, save_statistics

from .statistics import collect_statistics
from .tasks import CALIBRATION_PROMPTS, CALIBRATION_SEED, task_by_name

PROMPTS_FILE = "calibration_prompts.jsonl"


def ensure_calibration(
    model_dir: Path, adapters: Mapping[str, Path], progress: Callable[[str], None] | None = None
) -> None:
    """Write the calibration prompts and input statistics of each default adapter that lacks
    them (each file atomically)."""
    emit = progress or (lambda _line: None)
    for name, folder in adapters.items():
        prompts = [
            e.prompt for e in task_by_name(name).examples(CALIBRATION_SEED, CALIBRATION_PROMPTS)
        ]
        if not (folder / PROMPTS_FILE).is_file():
            _write_atomically(
                folder / PROMPTS_FILE, "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
            )
        if (folder / STATISTICS_FILE).is_file():
            continue
        started = time.monotonic()
        modules = load_adapter(folder, name).modules
        save_statistics(collect_statistics(model_dir, prompts, modules), folder)
        emit(f"input statistics of adapter {name}: {len(prompts)} prompts, "
             f"{time.monotonic() - started:.1f} s")  # fmt: skip


def _write_atomically(path: Path, text: str) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
