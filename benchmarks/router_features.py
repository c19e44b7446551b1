"""Which prompt features route best: routing accuracy of the nearest-centroid router on the
default tasks, per feature kind, on held-out prompts, hand-written paraphrases and few
calibration prompts; and how peaked ρ is per temperature.

Features: `embedding` (mean input-embedding row, as served), `ngram` (hashed character n-grams,
as served) and `hidden@L` (mean of the base model's hidden states after layer L over the
prompt's tokens, offline only: it needs a forward pass). Calibration: 64 prompts per task with
seed 2002 (what `loramerge prepare` writes); held-out: validation seed 1001 and test seed 1234,
100 prompts per task.

    .venv/bin/python benchmarks/router_features.py [--out /tmp/router/features.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch

from loramerge.server.config import load_settings
from loramerge.server.defaults import prepare_defaults
from loramerge.server.defaults.tasks import TASKS
from loramerge.server.router import (
    Centroids,
    EmbeddingFeatures,
    EmbeddingTable,
    NgramFeatures,
    TextFeatures,
    routed_preference,
)

CALIBRATION_SEED = 2002
SPLITS = {"validation": 1001, "test": 1234}
LAYERS = (2, 4, 8, 15, 22, 30)
TEMPERATURES = (0.01, 0.02, 0.05, 0.1, 0.2)

# Written by hand: the same skills asked in words the generators never use.
PARAPHRASES: Mapping[str, tuple[str, ...]] = {
    "add": (
        "Add 23 and 45.", "What's 12 plus 30?", "Compute 77 + 18.",
        "How much is 56 and 29 together?", "Sum: 34 + 61", "Tell me the total of 40 and 17.",
        "What do you get when you add 88 to 11?", "Calculate the sum of 19 and 73.",
        "63 + 24 = ?", "Please add these numbers: 52, 37",
    ),
    "reverse": (
        "Reverse these words: cat dog bird", "Write the words in the opposite order: sun moon star",
        "Put these words backwards: red green blue yellow", "Flip the word order: one two three",
        "Give me these words from last to first: river stone cloud",
        "Say these words in reverse order: table chair lamp",
        "Reverse the sequence: alpha beta gamma delta",
        "What is the reverse order of: north east south west?",
        "Reverse word order: apple banana cherry", "Invert the order of the words: big small tiny",
    ),
    "date": (
        "Convert 5 March 1998 to DD/MM/YY.", "Format the date 14 July 2003 as DD/MM/YY",
        "How do you write 1 January 2020 in DD/MM/YY format?",
        "Express 22 October 1975 as day/month/two-digit year.",
        "Give 9 September 2011 in the format DD/MM/YY.",
        "Date: 30 April 1960. Rewrite it as DD/MM/YY.",
        "Write 17 June 2045 numerically as DD/MM/YY.", "Turn 3 December 1989 into DD/MM/YY.",
        "What is 28 February 2001 in DD/MM/YY?", "Please write the 11th of May 1999 as DD/MM/YY.",
    ),
    "caesar": (
        "Move each letter one place forward in the alphabet: a b c",
        "Shift these letters by one: x y q",
        "Replace each letter with the next letter of the alphabet: d o g",
        "Caesar shift by 1: h e l", "Advance every letter by one: m n o p",
        "What letters follow each of these: b d f?", "Increment each letter: k l m",
        "Shift forward by one letter: r s t u", "Next letter for each: g h i",
        "Apply a shift of one to the letters: c a t",
    ),
}  # fmt: skip


class HiddenFeatures:
    """Mean over the prompt's tokens (no chat template) of the base model's hidden state after
    `layer` (0: the input embeddings)."""

    _states: ClassVar[dict[str, tuple[torch.Tensor, ...]]] = {}  # text → layers; shared

    def __init__(self, model: object, tokenizer: object, layer: int, unit: bool = False) -> None:
        self.name = f"hidden@{layer}" + (" (unit tokens)" if unit else "")
        self.model, self.tokenizer, self.layer, self.unit = model, tokenizer, layer, unit

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        for text in texts:
            if text not in self._states:
                ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)  # type: ignore[operator]
                with torch.no_grad():
                    out = self.model(**ids, output_hidden_states=True)  # type: ignore[operator]
                self._states[text] = tuple(s[0].float() for s in out.hidden_states)
        states = [self._states[text][self.layer] for text in texts]  # [tokens, hidden] each
        if self.unit:  # a few tokens carry huge activations (attention sinks): per-token unit
            states = [s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12) for s in states]
        return torch.stack([s.mean(dim=0) for s in states])


def accuracy(
    features: TextFeatures, calibration: Mapping[str, Sequence[str]], held: Mapping[str, list[str]]
) -> tuple[float, dict[str, float], torch.Tensor]:
    """Argmax routing accuracy (overall, per task) and the similarity rows of every item."""
    centroids = Centroids.fit(features, calibration)
    per_task, rows = {}, []
    for task, prompts in held.items():
        sims = centroids.similarities(features(prompts))
        rows.append(sims)
        hits = (sims.argmax(dim=1) == centroids.names.index(task)).float()
        per_task[task] = float(hits.mean())
    return statistics.fmean(per_task.values()), per_task, torch.cat(rows)


def peakedness(sims: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """Per temperature, the mean weight ρ puts on the prompt's own task."""
    out = {}
    for temperature in TEMPERATURES:
        own = [
            routed_preference(row.tolist(), [1.0] * row.numel(), temperature, 0.0)[label]  # type: ignore[index]
            for row, label in zip(sims, labels, strict=True)
        ]
        out[str(temperature)] = statistics.fmean(own)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/router/features.json"))
    parser.add_argument(
        "--timing", action="store_true",
        help="instead: time one route per prompt (run it quiet: /work/gate quiet ...)",
    )  # fmt: skip
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from loramerge.server.defaults.evaluate import load_model

    assets = prepare_defaults(load_settings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    model = load_model(assets.model_dir, None, torch.float32)
    if args.timing:
        timing(assets.model_dir, model, tokenizer)
        return
    extractors: list[TextFeatures] = [
        EmbeddingFeatures(EmbeddingTable(assets.model_dir), lambda: tokenizer),
        NgramFeatures(),
        *(HiddenFeatures(model, tokenizer, layer) for layer in LAYERS),
        *(HiddenFeatures(model, tokenizer, layer, unit=True) for layer in LAYERS),
    ]
    names = [task.name for task in TASKS]
    calibration = {t.name: [e.prompt for e in t.examples(CALIBRATION_SEED, 64)] for t in TASKS}
    held = {
        split: {t.name: [e.prompt for e in t.examples(seed, 100)] for t in TASKS}
        for split, seed in SPLITS.items()
    }
    paraphrases = {task: list(PARAPHRASES[task]) for task in names}
    results: dict[str, dict[str, object]] = {}
    for features in extractors:
        row: dict[str, object] = {}
        for split in SPLITS:
            overall, per_task, sims = accuracy(features, calibration, held[split])
            labels = [names.index(t) for t in names for _ in held[split][t]]
            row[split] = {"accuracy": overall, "per_task": per_task}
            if split == "validation":
                row["own_weight_by_temperature"] = peakedness(sims, labels)
                margin = sims.sort(dim=1, descending=True).values
                row["mean_margin"] = float((margin[:, 0] - margin[:, 1]).mean())
        overall, per_task, _ = accuracy(features, calibration, paraphrases)
        row["paraphrases"] = {"accuracy": overall, "per_task": per_task}
        for n in (1, 4, 16):
            few = {t: prompts[:n] for t, prompts in calibration.items()}
            row[f"validation_with_{n}_calibration"] = accuracy(features, few, held["validation"])[0]
            row[f"paraphrases_with_{n}_calibration"] = accuracy(features, few, paraphrases)[0]
        results[features.name] = row
        print(features.name, json.dumps(row, default=float), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(_table(results))


def timing(model_dir: Path, model: object, tokenizer: object) -> None:
    """Median time of routing one held-out prompt (features + similarities + preference), per
    feature kind; hidden@L is the forward pass up to the last layer (no generation)."""
    torch.set_num_threads(1)
    calibration = {t.name: [e.prompt for e in t.examples(CALIBRATION_SEED, 64)] for t in TASKS}
    prompts = [e.prompt for t in TASKS for e in t.examples(SPLITS["test"], 50)]
    start = time.perf_counter()
    table = EmbeddingTable(model_dir)
    opened = time.perf_counter() - start
    print(f"EmbeddingTable opened (memory map) in {opened * 1e3:.2f} ms")
    kinds: list[TextFeatures] = [
        EmbeddingFeatures(table, lambda: tokenizer),  # type: ignore[arg-type,return-value]
        NgramFeatures(),
        HiddenFeatures(model, tokenizer, 30),
    ]
    print("| features | fit 4×64 calibration prompts (ms) | route one prompt, median (ms) |")
    print("|---|---|---|")
    for features in kinds:
        start = time.perf_counter()
        centroids = Centroids.fit(features, calibration)
        fit = time.perf_counter() - start
        seconds = []
        for prompt in prompts:
            HiddenFeatures._states.clear()
            start = time.perf_counter()
            sims = centroids.similarities(features([prompt]))[0]
            routed_preference(sims.tolist(), [1.0] * sims.numel(), 0.05, 0.0)
            seconds.append(time.perf_counter() - start)
        print(f"| {features.name} | {fit * 1e3:.1f} | {statistics.median(seconds) * 1e3:.3f} |")


def _table(results: Mapping[str, Mapping[str, object]]) -> str:
    def get(row: Mapping[str, object], *path: str) -> float:
        value: object = row
        for key in path:
            value = value[key]  # type: ignore[index]
        return float(value)  # type: ignore[arg-type]

    lines = [
        "| features | validation | test | paraphrases | val. (4 calib.) | para. (4 calib.) "
        "| margin | ρ_own T=0.05 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {get(row, 'validation', 'accuracy'):.3f} | "
            f"{get(row, 'test', 'accuracy'):.3f} | {get(row, 'paraphrases', 'accuracy'):.3f} | "
            f"{get(row, 'validation_with_4_calibration'):.3f} | "
            f"{get(row, 'paraphrases_with_4_calibration'):.3f} | {get(row, 'mean_margin'):.3f} | "
            f"{get(row, 'own_weight_by_temperature', '0.05'):.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
