"""The CLI's two consoles (stdout for results, stderr for progress and errors)."""

from __future__ import annotations

import sys

from rich.console import Console

__all__ = ["err", "out"]

WIDTH = None if sys.stdout.isatty() else 160
"""Piped output (CI logs, files) gets wide tables instead of rich's 80-column default."""
out = Console(soft_wrap=True, width=WIDTH)
err = Console(stderr=True, soft_wrap=True, width=WIDTH)
