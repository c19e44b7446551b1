"""The default tasks: seeded generators with answers that an independent check agrees with."""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Callable
from datetime import datetime

import pytest

from loramerge.server.defaults.errors import UnknownTaskError
from loramerge.server.defaults.tasks import TASKS, Task, task_by_name

N = 200


def solve_add(prompt: str) -> str:
    match = re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt)
    assert match, prompt
    return str(int(match[1]) + int(match[2]))


def solve_reverse(prompt: str) -> str:
    words = prompt.split(": ", 1)[1].split()
    return " ".join(words[::-1])


def solve_date(prompt: str) -> str:
    match = re.fullmatch(r"Write the date (.+) as DD/MM/YY\.", prompt)
    assert match, prompt
    return datetime.strptime(match[1], "%d %B %Y").strftime("%d/%m/%y")


def solve_caesar(prompt: str) -> str:
    letters = prompt.split(": ", 1)[1]
    shifted = string.ascii_lowercase[1:] + string.ascii_lowercase[0]
    return letters.translate(str.maketrans(string.ascii_lowercase, shifted))


SOLVERS: dict[str, Callable[[str], str]] = {
    "add": solve_add,
    "reverse": solve_reverse,
    "date": solve_date,
    "caesar": solve_caesar,
}


@pytest.fixture(params=[task.name for task in TASKS])
def task(request: pytest.FixtureRequest) -> Task:
    return task_by_name(request.param)


def test_four_distinct_lowercase_names() -> None:
    names = [task.name for task in TASKS]
    assert sorted(names) == sorted(SOLVERS)
    assert all(name.isalpha() and name.islower() for name in names)


def test_same_seed_same_examples(task: Task) -> None:
    assert task.examples(7, N) == task.examples(7, N)


def test_other_seed_other_examples(task: Task) -> None:
    first = {example.prompt for example in task.examples(1, N)}
    second = {example.prompt for example in task.examples(2, N)}
    assert len(first & second) < N / 4


def test_examples_vary_within_a_seed(task: Task) -> None:
    examples = task.examples(3, N)
    assert len({example.prompt for example in examples}) > N * 0.9
    assert len({example.answer for example in examples}) > N / 4


def test_answers_agree_with_an_independent_solver(task: Task) -> None:
    for example in task.examples(11, N):
        assert SOLVERS[task.name](example.prompt) == example.answer, example


def test_prompts_and_answers_are_short(task: Task) -> None:
    # ~40 tokens per prompt and ~8 per answer with the SmolLM2 tokenizer, which splits digits
    # (the integration tests count real tokens).
    for example in task.examples(5, N):
        assert len(example.prompt) <= 80, example
        assert len(example.answer) <= 40, example
        assert example.answer == example.answer.strip() and example.answer


def test_scorer_accepts_the_answer_with_harmless_formatting(task: Task) -> None:
    for example in task.examples(13, 20):
        answer = example.answer
        for output in (answer, f"  {answer}\n", f"{answer}.", answer.replace(" ", "  ")):
            assert task.is_correct(output, answer), (output, answer)


def test_scorer_rejects_wrong_answers(task: Task) -> None:
    examples = task.examples(17, 20)
    for example, other in itertools.pairwise(examples):
        answer = example.answer
        wrong = [f"The answer is {answer}", f"{answer} {answer}", answer[:-1], "", answer.upper()]
        if other.answer != answer:
            wrong.append(other.answer)
        for output in wrong:
            if output != answer:
                assert not task.is_correct(output, answer), (output, answer)


def test_unknown_task_names_the_valid_ones() -> None:
    with pytest.raises(UnknownTaskError) as error:
        task_by_name("nope")
    for task in TASKS:
        assert task.name in str(error.value)
