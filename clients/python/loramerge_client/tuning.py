"""Files for TARA tuning: phi.json (what `loramerge tune --objective entropy` writes) and prompt
files (JSONL or plain lines), read without torch."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PHI_FORMAT = "loramerge.tara-phi.v1"
"""`format` of phi.json."""


def read_phi_file(path: str | Path) -> dict[str, Any]:
    """phi.json as a dict, checked for the fields `SetTenant`'s `tuned` needs. Raises
    ValueError naming the file and field."""
    where = Path(path)
    try:
        data = json.loads(where.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: cannot read TARA weights: {err}") from None
    if not isinstance(data, Mapping) or data.get("format") != PHI_FORMAT:
        raise ValueError(f"{where}: not a phi.json of `loramerge tune` (format {PHI_FORMAT!r})")
    for name, kind in (("adapters", list), ("adapter_fingerprints", list),
                       ("preference", dict), ("modules", dict)):  # fmt: skip
        if not isinstance(data.get(name), kind):
            raise ValueError(f"{where}: field {name!r} must be a {kind.__name__}")
    for key, rows in data["modules"].items():
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise ValueError(f"{where}: modules[{key!r}] must be a list of rows (one per adapter)")
    return dict(data)


def read_prompt_file(path: str | Path) -> list[tuple[str, str | None]]:
    """(prompt, task) per line of a prompt file. A line is JSON with `prompt` (or `messages`,
    whose last user turn is taken) and optionally `task` (or `adapter`): the adapter whose task
    the prompt is; any other line is a prompt without a task. Raises ValueError naming the file
    and line."""
    where = Path(path)
    try:
        content = where.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ValueError(f"{where}: cannot read ({reason})") from None
    prompts: list[tuple[str, str | None]] = []
    for number, line in enumerate(content.splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if not text.startswith("{"):
            prompts.append((text, None))
            continue
        try:
            record = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{where}:{number}: invalid JSON ({err})") from None
        task = record.get("task", record.get("adapter")) if isinstance(record, dict) else None
        if task is not None and not isinstance(task, str):
            raise ValueError(f"{where}:{number}: 'task' must be an adapter name")
        prompts.append((_prompt_of(record, f"{where}:{number}"), task or None))
    if not prompts:
        raise ValueError(f"{where} holds no prompts")
    return prompts


def _prompt_of(record: Any, where: str) -> str:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return str(record["prompt"])
    messages = record.get("messages") if isinstance(record, dict) else None
    if isinstance(messages, list):
        users = [
            m["content"]
            for m in messages
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
        ]
        if users:
            return str(users[-1])
    raise ValueError(f"{where}: expected a 'prompt' string or user 'messages'")
