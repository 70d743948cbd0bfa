"""Run ``adapter.cli.main.main`` in a forked child (for the SIGKILL tests in test_atomic.py).

Children fork from a forkserver that has already imported torch and adapter, so a kill
point lands in the conversion itself rather than in interpreter start-up.
"""

from __future__ import annotations

import os
import sys

PRELOAD = [
    "torch",
    "torch.export",
    "torch.onnx",
    "onnx",
    "onnx_ir",
    "onnxscript",
    "onnxruntime",
    "adapter.cli.main",
    "adapter.cli.commands",
    "adapter.converter.api",
    "adapter.converter.importer",
    "adapter.backends.onnxruntime",
]


def run_cli(argv: list[str], cache: str, tests: str, log: str | None = None) -> None:
    """The child's body: private cache, tests/ importable, output silenced (stderr to ``log`` when given),
    exit with main's code."""
    os.environ["ADAPTER_CACHE_DIR"] = cache
    os.environ.pop("ADAPTER_DEBUG", None)
    sys.path.insert(0, tests)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if log else devnull, 2)
    from adapter.cli.main import main

    code = main(argv)
    sys.stdout.flush()
    os._exit(code)
