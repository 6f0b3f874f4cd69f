"""The bundled Spec-Bench questions (question.jsonl, see NOTICE) and the one reader of Spec-Bench style JSONL.

A row is ``{"question_id": ..., "category": "...", "turns": ["first user turn", ...]}``; only the first turn
is used. `read_questions` serves the benches (`specdec.bench`) and the drafters that calibrate or count
tokens on Spec-Bench text (`self`, `model` with draft_vocab).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from specdec.errors import SpecdecError


def read_questions(path: str | Path | None = None, per_category: int | None = None,
                   limit: int | None = None) -> list[dict]:
    """[{"question_id", "category", "text"}] from `path` (None: the bundled Spec-Bench).

    Grouped by category (categories in order of first appearance, file order within each); at most
    `per_category` of each category, then at most `limit` in all. SpecdecError (one line) for a missing file,
    a line that is not a Spec-Bench row, or no questions.
    """
    picked: dict[str, list[dict]] = {}
    for n, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            cat, turn = row["category"], row["turns"][0]
            rows = picked.setdefault(cat, [])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise SpecdecError(f"prompt file line {n} is not a Spec-Bench row (category, turns): fix it") from None
        if per_category is None or len(rows) < per_category:
            rows.append({"question_id": row.get("question_id", n), "category": cat, "text": turn})
    questions = [q for rows in picked.values() for q in rows][:limit]
    if not questions:
        raise SpecdecError("no prompts found: the prompt file is empty")
    return questions


def _text(path: str | Path | None) -> str:
    if path is None:
        return resources.files(__name__).joinpath("question.jsonl").read_text(encoding="utf-8")
    p = Path(path)
    if not p.is_file():
        raise SpecdecError(f"prompt file {p} not found: give a Spec-Bench style JSONL to --prompts")
    return p.read_text(encoding="utf-8")
