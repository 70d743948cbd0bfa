"""A uvicorn server in a thread on a free loopback port, and the end reasons of batcher requests,
for the serving tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackServer:
    """``with LoopbackServer(app) as url:`` serves ``app`` until the block ends."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class Endings:
    """How ``ContinuousBatcher`` requests ended: ``emit(i)`` is request ``i``'s emit callback,
    ``reasons[i]`` its finish reason once ``events[i]`` is set."""

    def __init__(self, count: int) -> None:
        self.events = [threading.Event() for _ in range(count)]
        self.reasons: dict[int, str] = {}

    def emit(self, i: int):
        def emit(token, reason):
            if reason:
                self.reasons[i] = reason
                self.events[i].set()

        return emit

    def wait(self, timeout: float, i: int | None = None) -> bool:
        return all(e.wait(timeout) for e in (self.events if i is None else [self.events[i]]))


def run_batcher(batcher, requests: list, endings: Endings, timeout: float) -> None:
    """Start ``batcher``, submit ``requests``, wait for every ending and stop it."""
    batcher.start()
    try:
        for request in requests:
            batcher.submit(request)
        assert endings.wait(timeout)
    finally:
        batcher.stop()
