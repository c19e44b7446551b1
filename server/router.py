"""Preference from the prompt: a per-request router in the style of Twin-Merging.

A routed request gets the preference

    ρ ∝ ρ_prior ⊙ softmax(s(x) / T),   s_t(x) = cos(f(x) − μ, c_t)

where f(x) is a feature vector of the prompt's text, c_t the (centred, unit) centroid of the
features of adapter t's calibration prompts, μ the mean of the adapters' raw centroids (every
adapter counts once, whatever its number of prompts), T the temperature and ρ_prior the
tenant's stored (or the request's inline) preference, uniform when there is none. Weights below
`min_weight` are dropped (the largest always stays), and ρ is rounded to `step` of the simplex
(weights under half a step dropped, then largest remainders), so close prompts share one merged
version.

Features (docs/router.md has the measurements that chose the default):
- `embedding`: the mean of the base model's input-embedding rows over the text's tokens, read
  from the model's safetensors through a memory map (only the rows a prompt touches are read:
  a 7B model's table costs nothing until used), with the engine's own tokenizer.
- `ngram`: hashed character 3–5-grams (no model, no tokenizer), log term frequencies.

Only adapters with calibration prompts can be routed to: the file `calibration_prompts.jsonl`
in the adapter's directory, or a file the `router.calibration` setting names (for adapters
whose directory is read-only). The file holds JSONL lines with `prompt` or `messages`, or plain
text lines (`loramerge_client.tuning.read_prompt_file`).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from loramerge.merge_engine import AdapterPool
from loramerge_client.tuning import read_prompt_file

from .config import RouterSettings
from .errors import ConfigError
from .version_key import quantize_preference

CALIBRATION_FILE = "calibration_prompts.jsonl"
FEATURES = ("embedding", "ngram")
MAX_TEMPERATURE = 10.0
MAX_MIN_WEIGHT = 0.5
NGRAM_DIMENSIONS = 1 << 16
NGRAM_SIZES = (3, 4, 5)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# Where causal LMs keep their input embedding, most common first.
EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight",
    "embed_tokens.weight",
)


class RouterError(Exception):
    """The router cannot be built or used as configured; `path` names the file at fault."""


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class TextFeatures(Protocol):
    """Texts → feature vectors, one row per text. → [n, d] float32"""

    name: str

    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...


# ----------------------------------------------------------------------------- features


class EmbeddingTable:
    """A model's input-embedding matrix [vocab, hidden], memory-mapped from its safetensors
    file: rows are read from disk (or the page cache) only when indexed."""

    def __init__(self, model_dir: Path) -> None:
        self.path, name = _find_embedding(model_dir)
        with self.path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
            entry = header[name]
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None or len(entry["shape"]) != 2:
                raise RouterError(
                    f"{self.path}: {name} is {entry['dtype']} {entry['shape']}, not a 2-D "
                    "floating-point embedding matrix"
                )
            start, end = entry["data_offsets"]
            # ACCESS_COPY: a private mapping torch may view as writable; nothing is written.
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        rows, columns = entry["shape"]
        flat = torch.frombuffer(
            self._map, dtype=dtype, count=rows * columns, offset=8 + size + start
        )
        if (end - start) != flat.numel() * flat.element_size():
            raise RouterError(f"{self.path}: {name} has {end - start} bytes, not {rows}×{columns}")
        self.name = name
        self.weight = flat.view(rows, columns)  # [vocab, hidden], a view of the mapping

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def mean_rows(self, ids: Sequence[int]) -> torch.Tensor:
        """Mean of the rows `ids` in float32 (zeros for no ids). → [hidden]"""
        if not ids:
            return torch.zeros(self.weight.shape[1])
        index = torch.tensor(ids, dtype=torch.long).clamp_(0, self.vocab_size - 1)
        return self.weight.index_select(0, index).float().mean(dim=0)


def _find_embedding(model_dir: Path) -> tuple[Path, str]:
    """The safetensors file holding the input embedding, and its tensor name."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: Mapping[str, str] = json.loads(index.read_text()).get("weight_map", {})
        for name in EMBEDDING_NAMES:
            if name in weight_map:
                return model_dir / weight_map[name], name
        raise RouterError(f"{index}: no input embedding among {', '.join(EMBEDDING_NAMES)}")
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            names = json.loads(handle.read(size))
        for name in EMBEDDING_NAMES:
            if name in names:
                return path, name
    raise RouterError(
        f"{model_dir}: no safetensors file with an input embedding "
        f"({', '.join(EMBEDDING_NAMES)}); use router.features: ngram"
    )


class EmbeddingFeatures:
    """Mean input-embedding row over the text's tokens (special tokens not added)."""

    name = "embedding"

    def __init__(self, table: EmbeddingTable, tokenizer: Callable[[], Tokenizer]) -> None:
        self.table = table
        self._tokenizer = tokenizer

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        tokenizer = self._tokenizer()
        rows = [self.table.mean_rows(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
        return torch.stack(rows) if rows else torch.zeros(0, self.table.weight.shape[1])


class NgramFeatures:
    """Hashed character n-grams of the lower-cased text (words joined by one space, padded
    with spaces), counted as log(1 + count) in `dimensions` buckets."""

    name = "ngram"

    def __init__(self, dimensions: int = NGRAM_DIMENSIONS, sizes: Sequence[int] = NGRAM_SIZES):
        self.dimensions = dimensions
        self.sizes = tuple(sizes)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dimensions)
        for row, text in enumerate(texts):
            padded = f" {' '.join(text.lower().split())} "
            counts: dict[int, int] = {}
            for n in self.sizes:
                for i in range(len(padded) - n + 1):
                    bucket = zlib.crc32(padded[i : i + n].encode()) % self.dimensions
                    counts[bucket] = counts.get(bucket, 0) + 1
            if counts:
                values = torch.tensor(list(counts.values()), dtype=torch.float)
                out[row, torch.tensor(list(counts))] = torch.log1p(values)
        return out


# ----------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Centroids:
    """Per routable adapter, the centred unit centroid of its calibration prompts' features."""

    names: tuple[str, ...]  # routable adapters, pool order
    mean: torch.Tensor  # [d] μ: the mean of the adapters' raw centroids
    vectors: torch.Tensor  # [N, d] unit rows

    @classmethod
    def fit(cls, features: TextFeatures, prompts: Mapping[str, Sequence[str]]) -> Centroids:
        """From each adapter's calibration prompts (adapters with none are left out)."""
        names = tuple(name for name, texts in prompts.items() if texts)
        if not names:
            raise RouterError("no adapter has calibration prompts")
        raw = torch.stack([features(prompts[name]).mean(dim=0) for name in names])  # [N, d]
        mean = raw.mean(dim=0)
        return cls(names, mean, _unit(raw - mean))

    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each row's centred features to each centroid. → [n, N]"""
        return _unit(features - self.mean) @ self.vectors.T


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def routed_preference(
    similarities: Sequence[float],
    prior: Sequence[float],
    temperature: float,
    min_weight: float,
) -> tuple[float, ...] | None:
    """ρ ∝ prior ⊙ softmax(similarities / T) (T = 0: the most similar adapter with a prior
    weight), weights below `min_weight` dropped (the largest stays), on the simplex. None when
    the prior gives every routable adapter weight 0."""
    if len(similarities) != len(prior):
        raise ValueError("similarities and prior differ in length")
    allowed = [i for i, weight in enumerate(prior) if weight > 0]
    if not allowed:
        return None
    if temperature == 0:
        best = max(allowed, key=lambda i: (similarities[i], -i))
        return tuple(1.0 if i == best else 0.0 for i in range(len(prior)))
    top = max(similarities[i] for i in allowed)
    weights = [
        prior[i] * math.exp((similarities[i] - top) / temperature) if prior[i] > 0 else 0.0
        for i in range(len(prior))
    ]
    total = math.fsum(weights)
    rho = [w / total for w in weights]
    largest = max(range(len(rho)), key=lambda i: (rho[i], -i))
    kept = [w if w >= min_weight or i == largest else 0.0 for i, w in enumerate(rho)]
    total = math.fsum(kept)
    return tuple(w / total for w in kept)


def on_step(rho: Sequence[float], step: float) -> tuple[float, ...]:
    """ρ rounded to `step` of the simplex, as weights summing to 1. Unlike a stated preference,
    whose every non-zero weight keeps a unit, a routed weight under half a step is a softmax
    tail, not a choice: it is dropped (the largest weight always stays) before the largest
    remainder rounding."""
    largest = max(range(len(rho)), key=lambda i: (rho[i], -i))
    kept = tuple(w if w >= step / 2 or i == largest else 0.0 for i, w in enumerate(rho))
    units = quantize_preference(kept, step)
    total = sum(units)
    return tuple(u / total for u in units)


# ----------------------------------------------------------------------------- the server's router


@dataclass(frozen=True)
class RouteParams:
    """How one request is routed (resolved: request over tenant over server)."""

    temperature: float
    min_weight: float
    step: float


@dataclass(frozen=True)
class Route:
    """A routing decision: ρ in pool order, or None when the router abstained (the prior has no
    routable adapter); `similarities` per routable adapter."""

    rho: tuple[float, ...] | None
    routable: tuple[str, ...]
    similarities: tuple[float, ...]


class Router:
    """Routes texts to preferences over a pool; centroids are fitted once per pool (and per
    calibration files' content) and kept."""

    def __init__(
        self,
        features: TextFeatures,
        calibration: Mapping[str, Path] | None = None,
        max_prompts: int = 256,
        max_text_chars: int = 2048,
    ) -> None:
        self.features = features
        self._calibration = dict(calibration or {})
        self._max_prompts = max_prompts
        self._max_text_chars = max_text_chars
        self._fitted: tuple[str, Centroids] | None = None  # (pool fingerprint, centroids)
        self._lock = threading.Lock()

    def calibration_path(self, pool: AdapterPool, name: str) -> Path | None:
        """The calibration prompt file of adapter `name`: configured, else in its directory."""
        path = self._calibration.get(name)
        if path is not None:
            return path
        candidate = pool.adapter(name).path / CALIBRATION_FILE
        return candidate if candidate.is_file() else None

    def calibration_prompts(self, pool: AdapterPool) -> dict[str, list[str]]:
        """Every adapter's calibration prompts (empty: not routable); at most `max_prompts`."""
        prompts: dict[str, list[str]] = {}
        for name in pool.names:
            path = self.calibration_path(pool, name)
            if path is None:
                prompts[name] = []
                continue
            try:
                texts = [text for text, _task in read_prompt_file(path)]
            except ValueError as err:
                raise RouterError(f"calibration prompts of adapter {name!r}: {err}") from None
            prompts[name] = texts[: self._max_prompts]
        return prompts

    def centroids(self, pool: AdapterPool) -> Centroids:
        """The pool's centroids, fitted on first use per pool."""
        with self._lock:
            if self._fitted is not None and self._fitted[0] == pool.fingerprint:
                return self._fitted[1]
            fitted = Centroids.fit(self.features, self.calibration_prompts(pool))
            self._fitted = (pool.fingerprint, fitted)
            return fitted

    def route(
        self, pool: AdapterPool, text: str, prior: Sequence[float] | None, params: RouteParams
    ) -> Route:
        """The routed preference of `text` over `pool` (pool order); `prior` None: uniform."""
        centroids = self.centroids(pool)
        similarities = centroids.similarities(self.features([text[: self._max_text_chars]]))[0]
        position = {name: i for i, name in enumerate(pool.names)}
        prior = prior if prior is not None else [1.0] * len(pool.names)
        routed = routed_preference(
            similarities.tolist(),
            [prior[position[name]] for name in centroids.names],
            params.temperature,
            params.min_weight,
        )
        values = tuple(float(s) for s in similarities)
        if routed is None:
            return Route(None, centroids.names, values)
        rho = [0.0] * len(pool.names)
        for name, weight in zip(centroids.names, routed, strict=True):
            rho[position[name]] = weight
        return Route(on_step(rho, params.step), centroids.names, values)


def feature_extractor(kind: str, model_dir: Path, tokenizer: Callable[[], Any]) -> TextFeatures:
    """The features `kind` ("embedding" or "ngram") for the model in `model_dir`."""
    if kind == "ngram":
        return NgramFeatures()
    if kind == "embedding":
        return EmbeddingFeatures(EmbeddingTable(model_dir), tokenizer)
    raise RouterError(f"unknown router features {kind!r} (valid: {', '.join(FEATURES)})")


def build_router(
    settings: RouterSettings, model_dir: Path, tokenizer: Callable[[], Any]
) -> Router | None:
    """The server's router (None when routing is off). The configured calibration files are
    read now, so a missing or malformed one fails the start naming the setting."""
    if not settings.enabled:
        return None
    for name, path in settings.calibration.items():
        try:
            read_prompt_file(path.expanduser())
        except ValueError as err:
            field = f"router.calibration.{name}"
            raise ConfigError(f"invalid server setting: {err}", field) from None
    try:
        features = feature_extractor(settings.features, model_dir, tokenizer)
    except (RouterError, OSError, ValueError) as err:
        raise ConfigError(f"invalid server setting: {err}", "router.features") from None
    return Router(
        features,
        {name: path.expanduser() for name, path in settings.calibration.items()},
        max_prompts=settings.max_calibration_prompts,
        max_text_chars=settings.max_text_chars,
    )
