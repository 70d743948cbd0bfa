"""SQLite history of ``adapter bench`` results: one row per case result.

Several bench runs may write at once (two CI jobs on one machine): the database runs in
WAL mode, every connection waits on a busy lock (``timeout``), and each write is one
``BEGIN IMMEDIATE`` transaction retried with backoff if SQLite still reports the
database locked or busy, so no row is lost.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from adapter.core.artifact import cache_root
from adapter.core.errors import AdapterError

__all__ = ["History", "default_history_path"]

T = TypeVar("T")
_BUSY_TIMEOUT_S = 30.0
_RETRIES = 20
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    suite TEXT NOT NULL,
    created TEXT NOT NULL,
    case_name TEXT NOT NULL,
    machine TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    samples_ms TEXT NOT NULL,
    median_ms REAL,
    mad_ms REAL,
    throughput REAL,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_run ON results (run_id);
CREATE INDEX IF NOT EXISTS results_case ON results (case_name, machine);
"""


def default_history_path() -> Path:
    """``<cache root>/bench/history.sqlite``."""
    return cache_root() / "bench" / "history.sqlite"


def _locked(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class History:
    """The bench history database at ``path`` (created on first use).

    Raises:
        AdapterError: The file cannot be opened or is not a bench history.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AdapterError(f"Cannot create the folder of the bench history '{self.path}': {exc}.") from exc
        self._retry(self._init)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise AdapterError(f"Cannot open the bench history '{self.path}': {exc}.") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            yield conn
        finally:
            conn.close()

    def _retry(self, action: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``action`` on a fresh connection, retrying while the database is locked."""
        delay = 0.01
        for attempt in range(_RETRIES):
            try:
                with self._connect() as conn:
                    return action(conn)
            except sqlite3.OperationalError as exc:
                if not _locked(exc) or attempt == _RETRIES - 1:
                    raise AdapterError(
                        f"The bench history '{self.path}' could not be used: {exc}.",
                        "Another process may hold it locked; try again, or pass --history with another file.",
                    ) from exc
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)
            except sqlite3.DatabaseError as exc:
                raise AdapterError(
                    f"'{self.path}' is not a bench history database ({exc}).",
                    "Pass --history with another file, or move this one away.",
                ) from exc
        raise AssertionError("unreachable")

    def _init(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"database is locked (journal mode stayed {mode})")
        conn.executescript(_SCHEMA)

    def add_run(self, results: dict[str, Any]) -> int:
        """Store every case result of a run in one transaction; return how many rows."""
        fingerprint = results.get("fingerprint", {})
        rows = [
            (
                results["run_id"],
                results["suite"],
                results["created"],
                case["name"],
                fingerprint.get("machine_id", ""),
                json.dumps(fingerprint, sort_keys=True),
                json.dumps(case["samples_ms"]),
                case.get("median_ms"),
                case.get("mad_ms"),
                case.get("throughput"),
                json.dumps(case, sort_keys=True),
            )
            for case in results.get("cases", [])
        ]

        def write(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO results (run_id, suite, created, case_name, machine, fingerprint, samples_ms, "
                    "median_ms, mad_ms, throughput, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return len(rows)

        return self._retry(write)

    def count(self) -> int:
        """Number of case results stored."""
        return self._retry(lambda conn: conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def runs(self, suite: str | None = None) -> list[dict[str, Any]]:
        """Stored runs, oldest first: run id, suite, created, machine, number of cases."""
        query = "SELECT run_id, suite, MIN(created), machine, COUNT(*), MIN(id) FROM results"
        query += " WHERE suite = ?" if suite else ""
        query += " GROUP BY run_id ORDER BY MIN(id)"
        rows = self._retry(lambda conn: conn.execute(query, (suite,) if suite else ()).fetchall())
        return [{"run_id": r[0], "suite": r[1], "created": r[2], "machine": r[3], "cases": r[4]} for r in rows]

    def load_run(self, selector: str, suite: str | None = None) -> dict[str, Any]:
        """A stored run as a results dict. ``selector``: ``latest``, ``latest~N`` (N runs
        before the latest) or a run id (a unique prefix is enough).

        Raises:
            AdapterError: No run matches, or the prefix names several runs.
        """
        runs = self.runs(suite)
        where = f" of suite '{suite}'" if suite else ""
        if not runs:
            raise AdapterError(
                f"The bench history '{self.path}' holds no runs{where}.", "Run `adapter bench run` first."
            )
        if selector == "latest" or selector.startswith("latest~"):
            back = selector.partition("~")[2] or "0"
            if not back.isdigit() or int(back) >= len(runs):
                raise AdapterError(
                    f"No run '{selector}' in the bench history '{self.path}': it holds {len(runs)} run(s){where}."
                )
            run_id = runs[-1 - int(back)]["run_id"]
        else:
            matches = [r["run_id"] for r in runs if r["run_id"].startswith(selector)]
            if len(matches) != 1:
                found = "no run" if not matches else f"{len(matches)} runs"
                raise AdapterError(
                    f"'{selector}' matches {found} in the bench history '{self.path}'.",
                    "Give `history:latest`, `history:latest~1` or more of a run id (see the results JSON).",
                )
            run_id = matches[0]
        rows = self._retry(
            lambda conn: conn.execute(
                "SELECT suite, created, fingerprint, result FROM results WHERE run_id = ? ORDER BY id", (run_id,)
            ).fetchall()
        )
        return {
            "format": "adapter-bench/1",
            "suite": rows[0][0],
            "run_id": run_id,
            "created": rows[0][1],
            "fingerprint": json.loads(rows[0][2]),
            "cases": [json.loads(r[3]) for r in rows],
            "source": f"history:{run_id}",
        }

    def medians(self, case: str, machine: str, limit: int = 20, exclude_run: str | None = None) -> list[float]:
        """Medians of the latest ``limit`` results of ``case`` on ``machine`` (newest first)."""
        rows = self._retry(
            lambda conn: conn.execute(
                "SELECT median_ms FROM results WHERE case_name = ? AND machine = ? AND run_id != ? "
                "ORDER BY id DESC LIMIT ?",
                (case, machine, exclude_run or "", limit),
            ).fetchall()
        )
        return [float(r[0]) for r in rows if r[0] is not None]
