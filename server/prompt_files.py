"""Prompt files: JSONL lines with `prompt` or chat `messages` (the last user turn is taken), or
plain text lines. `loramerge tune --prompts` and the router's calibration prompts read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class PromptFileError(ValueError):
    """A prompt file cannot be read; the message names the file (and line)."""


def read_prompts(path: Path) -> list[str]:
    """Prompts from JSONL (`prompt`, or `messages` whose last user turn is taken) or plain
    lines; blank lines are skipped. Errors name the file and line."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise PromptFileError(f"{path}: cannot read ({reason})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("{"):
            prompts.append(stripped)
            continue
        try:
            record = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        prompts.append(_prompt_of(record, f"{path}:{number}"))
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
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
    raise PromptFileError(f"{where}: expected a 'prompt' string or user 'messages'")
