"""User-facing error types.

Every failure a user can cause (a bad file, a wrong shape, an op no backend runs)
raises one of these. The CLI prints ``str(error)`` as one paragraph, without a
traceback, and exits with the class's ``exit_code``.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "SourceError",
    "UnsafeSourceError",
    "ExportError",
    "UnsupportedOpsError",
    "UnsupportedOp",
    "BackendUnavailableError",
    "InputMismatchError",
    "VerificationError",
    "ProfileError",
    "ArtifactError",
    "PassFailedError",
]

from dataclasses import dataclass


class AdapterError(Exception):
    """Base class of the errors a user sees.

    Args:
        message: What went wrong, naming the file, node or input concerned.
        hint: What to do about it; appended to the message.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} {self.hint}"
        return self.message


class SourceError(AdapterError):
    """The model source cannot be found, read or recognised."""

    exit_code = 2


class UnsafeSourceError(SourceError):
    """The source would run code or read files outside its folder if loaded."""


class ExportError(AdapterError):
    """torch.export or the ONNX exporter failed on the model."""

    exit_code = 3


@dataclass(frozen=True)
class UnsupportedOp:
    """One node a backend cannot run."""

    node: str
    op_type: str
    domain: str
    module: str
    reason: str

    def describe(self) -> str:
        op = f"{self.domain}::{self.op_type}" if self.domain else self.op_type
        where = f" in module '{self.module}'" if self.module else ""
        return f"{op} (node '{self.node}'{where}): {self.reason}"


class UnsupportedOpsError(AdapterError):
    """Nodes that the chosen backend cannot run, listed all at once."""

    exit_code = 4

    def __init__(self, backend: str, ops: list[UnsupportedOp], hint: str | None = None) -> None:
        self.backend = backend
        self.ops = list(ops)
        lines = "; ".join(op.describe() for op in self.ops)
        super().__init__(
            f"Backend '{backend}' cannot run {len(self.ops)} node(s): {lines}.",
            hint
            or "Choose another backend with --backend, or rewrite these modules with operations the backend supports.",
        )


class BackendUnavailableError(AdapterError):
    """A backend's SDK is missing or cannot run on this machine."""

    exit_code = 5


class InputMismatchError(AdapterError):
    """Run-time inputs do not match the engine's declared input specs."""

    exit_code = 6


class VerificationError(AdapterError):
    """The engine's outputs differ from the eager model's beyond tolerance."""

    exit_code = 7


class ProfileError(AdapterError):
    """A target profile is unknown or malformed."""

    exit_code = 8


class ArtifactError(AdapterError):
    """An engine artifact is missing, incomplete or corrupted."""

    exit_code = 9


class PassFailedError(AdapterError):
    """A graph pass failed on the model."""

    exit_code = 10


class BackendFailedError(AdapterError):
    """A backend's own tool rejected the model, crashed on it or hung (run in a child process)."""

    exit_code = 11
