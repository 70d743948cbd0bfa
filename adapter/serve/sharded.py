"""Serving a sharded decoder (``adapter shard CAUSAL_LM`` artifacts): the HTTP server and the
continuous batcher run here, the model runs on its ranks under torchrun.

:class:`ShardedEngine` stands in for ``LLMEngine`` in :func:`adapter.serve.completions.build_llm_app`.
Its ``slots`` start the ranks (``adapter.runtime.launch.run_sharded`` with the
``adapter.llm.rank_serve`` worker, in a thread) and connect them through a unix socket in a
private folder; :class:`RemoteSlots` sends each slot call of the batcher to rank 0, which
broadcasts it to every rank and answers with the logits. ``close`` ends the ranks.
"""

from __future__ import annotations

__all__ = ["RemoteSlots", "ShardedEngine", "is_sharded_llm"]

import contextlib
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from adapter.core.errors import AdapterError
from adapter.llm.engine import TextCodec
from adapter.llm.layout import DecoderLayout
from adapter.runtime.frames import pack, recv_frame, send_frame, unpack
from adapter.runtime.launch import run_sharded


def is_sharded_llm(manifest: dict[str, Any]) -> bool:
    return manifest.get("kind") == "sharded" and manifest.get("task") == "text-generation"


class RemoteSlots:
    """The batcher's slot calls, run by the ranks (``adapter.llm.rank_serve.RankSlots``)."""

    def __init__(self, engine: ShardedEngine) -> None:
        self.engine = engine

    def _call(self, header: dict[str, Any], arrays: list[np.ndarray], answer: bool = True) -> np.ndarray | None:
        with self.engine.lock:  # one call on the socket at a time (close() takes it too)
            conn = self.engine.conn
            if conn is None:
                raise AdapterError(f"The sharded engine's ranks are stopped: {self.engine.failure()}")
            try:
                send_frame(conn, pack(header, arrays))
                data = recv_frame(conn) if answer else b""
            except (OSError, ValueError) as exc:
                data = None
                reason = str(exc)
            else:
                reason = "the ranks closed the connection"
        if data is None:
            raise AdapterError(f"The sharded engine's ranks stopped ({reason}): {self.engine.failure()}")
        return unpack(data)[1][0] if answer else None

    def prefill(self, row: int, prompt: np.ndarray, mask: np.ndarray, start: int = 0) -> np.ndarray:
        header = {"op": "prefill", "row": row, "start": start}
        return self._call(header, [np.asarray(prompt, np.int64), np.asarray(mask, np.int64)])[0]

    def decode(self, tokens: np.ndarray, masks: np.ndarray, positions: np.ndarray) -> np.ndarray:
        arrays = [np.asarray(tokens, np.int64), np.asarray(masks, np.int64), np.asarray(positions, np.int64)]
        return self._call({"op": "decode"}, arrays)

    def move(self, source: int, target: int) -> None:
        self._call({"op": "move", "source": source, "target": target}, [], answer=False)

    def shift(self, rows: int, width: int, by: int) -> None:
        """Nothing to send: the ranks' caches align on the next step's masks (``StateSlots``)."""

    def shift_row(self, row: int, start: int, length: int, by: int) -> None:
        """Nothing to send: a filling prompt's cache is its own until it joins."""


class ShardedEngine(TextCodec):
    """A sharded generation artifact served from this process (see the module docstring);
    text through the tokenizer it bundles, when its source had one."""

    def __init__(self, folder: Path, manifest: dict[str, Any], timeout: float = 60.0, start_s: float = 600.0) -> None:
        self.folder, self.manifest = Path(folder), manifest
        self.layout = DecoderLayout.from_json(manifest["layout"])
        self.backend = f"{manifest['backend']} sharded (tp {manifest.get('tp', 1)} x pp {manifest.get('pp', 1)})"
        self.session = self
        self.timeout, self.start_s = timeout, start_s
        self.conn: socket.socket | None = None
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.outcome: dict[str, Any] = {}
        self.lines: list[str] = []

    @property
    def alive(self) -> bool:
        """Whether the ranks still run (``/health`` answers 503 once they stopped)."""
        return self.conn is not None and self.thread is not None and self.thread.is_alive()

    def failure(self) -> str:
        error = self.outcome.get("error")
        return str(error) if error else (self.lines[-1] if self.lines else "no message")

    def slots(self, rows: int, capacity: int) -> RemoteSlots:
        """Start the ranks and connect to rank 0; returns when they are ready for calls."""
        self.dir = Path(tempfile.mkdtemp(prefix="adapter-serve-"))  # private (0700): the socket's folder
        path = self.dir / "calls.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
        except OSError as exc:  # e.g. a TMPDIR so long the path passes the unix-socket limit
            listener.close()
            raise AdapterError(f"Cannot create the ranks' socket {path}: {exc}.", "Set TMPDIR to a short path.") from exc
        listener.listen(1)
        listener.settimeout(1.0)
        request = {"socket": str(path), "rows": rows, "capacity": capacity, "heartbeat": min(10.0, self.timeout / 4)}
        self.thread = threading.Thread(target=self._launch, args=(request,), name="adapter-ranks", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_s
        try:
            while self.conn is None:
                with contextlib.suppress(TimeoutError):
                    self.conn, _ = listener.accept()
                if self.conn is None and (not self.thread.is_alive() or time.monotonic() > deadline):
                    raise AdapterError(
                        f"The ranks of '{self.folder}' did not start: {self.failure()}",
                        "Check the artifact with `adapter launch ARTIFACT --nproc N generate --prompt-ids 1,2,3`.",
                    )
        finally:
            listener.close()
        self.conn.settimeout(None)
        return RemoteSlots(self)

    def _launch(self, request: dict[str, Any]) -> None:
        try:
            self.outcome = run_sharded(self.folder, int(self.manifest["world_size"]), timeout=self.timeout,
                                       request=request, worker="adapter.llm.rank_serve", on_line=self.lines.append)  # fmt: skip
        except AdapterError as exc:
            self.outcome = {"error": exc}

    def close(self) -> dict[str, Any]:
        """End the ranks (the socket closing is their stop) and wait for them; their outcome."""
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)  # wakes a call still waiting for an answer
            with self.lock:
                with contextlib.suppress(OSError):
                    send_frame(conn, pack({"op": "stop"}))
                conn.close()
                self.conn = None
        if self.thread is not None:
            self.thread.join(timeout=self.timeout + 60)
        if getattr(self, "dir", None) is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.outcome
