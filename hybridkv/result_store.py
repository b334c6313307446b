"""Append-only JSONL of evaluation rows, keyed by (model, task, method, budget), so a run resumes
where it stopped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ResultStore:
    """Append-only JSONL of result rows, indexed by (model, task, method, budget)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{self.path}:{number} is not a JSON line ({error}); fix or remove it.") from error
                self.rows[self.key(row)] = row

    @staticmethod
    def key(row: dict) -> tuple:
        return row["model"], row["task"], row["method"], row["budget"]

    def __contains__(self, key: tuple) -> bool:
        return key in self.rows

    def add(self, row: dict) -> None:
        self.rows[self.key(row)] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
