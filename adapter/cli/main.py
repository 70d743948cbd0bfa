"""The ``adapter`` command line (click + rich).

Every user-facing failure is an :class:`adapter.core.errors.AdapterError`: printed as one
paragraph, no traceback (``--debug`` shows it), non-zero exit.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

import click
from rich.markup import escape

from adapter.cli.console import err
from adapter.core.errors import AdapterError

_state = {"debug": False}

COMMANDS = {
    "convert": "adapter.cli.commands:convert",
    "check": "adapter.cli.commands:check",
    "run": "adapter.cli.commands:run",
    "targets": "adapter.cli.commands:targets",
    "ops": "adapter.cli.commands:ops",
    "info": "adapter.cli.commands:info",
    "generate": "adapter.cli.generate:generate",
    "profile": "adapter.cli.profile:profile",
    "bench": "adapter.cli.bench:bench",
    "plan": "adapter.cli.plan:plan",
    "shard": "adapter.cli.shard:shard",
    "launch": "adapter.cli.launch:launch",
    "serve": "adapter.cli.serve:serve",
}
"""Each command's module (all inside ``adapter.cli``, each importing what it needs at its
top), imported when the command runs or a help page lists it: ``adapter generate`` never
imports the converter and torch (~0.3 GB resident, ~2 s)."""


class _LazyGroup(click.Group):
    """click's lazily loaded subcommands: :data:`COMMANDS` names each command's module."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            module, attribute = COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return self.commands.get(name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.version_option(package_name="adapter")
def cli(debug: bool) -> None:
    """adapter: convert PyTorch models to verified, optimized engines.

    \b
    Example:
      adapter convert adapter.zoo:minilm --target host
    """
    _state["debug"] = debug or os.environ.get("ADAPTER_DEBUG") == "1"


class _LibraryWarnings(logging.Handler):
    """Libraries' log records (onnx-ir, onnxscript, ...) as one line each on stderr.

    Without a handler, Python's last-resort handler prints them with their tracebacks
    (onnx-ir logs a rejected shape inference with ``exc_info``); tracebacks are shown
    only with --debug.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().strip().splitlines()
            text = message[0] if message else ""
            if record.exc_info and record.exc_info[1] is not None and not _state["debug"]:
                lines = str(record.exc_info[1]).strip().splitlines()
                cause = f"{type(record.exc_info[1]).__name__}: {lines[0] if lines else ''}"
                # some libraries log "...: %s" with the exception only in exc_info
                text = text.replace("%s", cause, 1) if "%s" in text and not record.args else f"{text} ({cause})"
            err.print(f"[yellow]{record.levelname.lower()}:[/] {escape(record.name)}: {escape(text)}", highlight=False)
            if _state["debug"] and record.exc_info:
                err.print("".join(traceback.format_exception(*record.exc_info)), markup=False, highlight=False)
        except Exception:  # a log line must never break a command
            self.handleError(record)


def _install_log_handler() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _LibraryWarnings) for h in root.handlers):
        handler = _LibraryWarnings(logging.WARNING)
        root.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning errors into one-paragraph messages."""
    _state["debug"] = os.environ.get("ADAPTER_DEBUG") == "1"  # per invocation: never carried over
    _install_log_handler()
    try:
        # without standalone mode, click returns ctx.exit()'s code instead of raising it
        code = cli.main(args=argv, prog_name="adapter", standalone_mode=False)
        if isinstance(code, int) and code:
            return code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("Interrupted.")
        return 130
    except AdapterError as exc:
        if _state["debug"]:
            err.print(traceback.format_exc(), markup=False, highlight=False)
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return exc.exit_code
    except Exception as exc:  # a traceback reaching a user is a bug: say so plainly
        if _state["debug"]:
            err.print(traceback.format_exc(), markup=False, highlight=False)
        err.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc).splitlines()[0]) if str(exc) else ''} — "
            "this is a bug in adapter; run again with --debug for the traceback and report it.",
            highlight=False,
        )
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())
