"""Per-problem results appended to a JSONL file, so that an interrupted run can resume.

Each line is one finished problem (a JSON object with an ``id``). A line cut short by a
crash is ignored on reading, and a rerun skips the ids already present. The first line
of a file written by :class:`RunLog` is a header holding the settings the run used; a
rerun with other settings refuses to mix its results into the same file. Lines holding
``_run`` describe one invocation (e.g. its wall time), so totals survive resumption.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

HEADER_KEY = "_settings"
RUN_KEY = "_run"


class RunLog:
    """Append-only JSONL of finished problems, keyed by ``record["id"]``.

    ``settings`` (JSON-ready) are written once as the header line; opening an existing
    file with different settings raises ``ValueError`` naming both.
    """

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))
        self._lock = threading.Lock()
        self.records: dict[str, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                # A crash left a partial last line: later records start on a fresh one.
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({HEADER_KEY: self.settings})

    def _load(self) -> None:
        header_seen = False
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: that problem reruns
            if not isinstance(row, dict):
                continue
            if HEADER_KEY in row:
                if row[HEADER_KEY] != self.settings:
                    raise ValueError(
                        f"{self.path} was written with settings {row[HEADER_KEY]}, not "
                        f"{self.settings}; use another results directory or delete the file"
                    )
                header_seen = True
            elif RUN_KEY in row:
                self.runs.append(row[RUN_KEY])
            elif "id" in row:
                self.records[str(row["id"])] = row
        if not header_seen:
            self._append({HEADER_KEY: self.settings})

    def _append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def done(self, problem_id: str) -> bool:
        return problem_id in self.records

    def add(self, record: dict[str, Any]) -> None:
        """Append one finished problem (thread-safe); it must carry an ``id``."""
        if "id" not in record:
            raise ValueError(f"a run-log record needs an 'id', got keys {sorted(record)}")
        with self._lock:
            self._append(record)
            self.records[str(record["id"])] = record

    def add_run(self, info: dict[str, Any]) -> None:
        """Append what one invocation measured as a whole (e.g. its wall time)."""
        with self._lock:
            self._append({RUN_KEY: info})
            self.runs.append(info)
