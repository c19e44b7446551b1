from __future__ import annotations

from pathlib import Path

import pytest
import torch

from factories import random_factors, write_adapter, write_statistics
from loramerge.merge_engine import AdapterPool


@pytest.fixture
def pool3(tmp_path: Path) -> AdapterPool:
    """Three rank-4 adapters (code, finance, math) sharing output directions, with input
    statistics (for RegMean)."""
    shared = torch.randn(24, 8, generator=torch.Generator().manual_seed(5))
    paths = [
        write_adapter(tmp_path / name, random_factors(seed, shared=shared), alpha=alpha)
        for seed, (name, alpha) in enumerate([("code", 8), ("finance", 4), ("math", 16)])
    ]
    for seed, path in enumerate(paths, start=20):
        write_statistics(path, seed)
    return AdapterPool.load(paths)


def delta(result_module: object) -> torch.Tensor:
    return result_module.lora_b.double() @ result_module.lora_a.double()  # type: ignore[attr-defined]
