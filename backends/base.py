"""What every backend shares: support answers and the engine's checked ``run``."""

from __future__ import annotations

__all__ = ["Support", "EngineBase", "fix_shapes", "unsupported_nodes", "module_of", "profile_options", "threads_for", "require_module"]

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx_ir as ir

from adapter.core.artifact import read_manifest
from adapter.core.errors import BackendUnavailableError, InputMismatchError, UnsupportedOp
from adapter.core.specs import TensorSpec, check_inputs


class Support(NamedTuple):
    """Whether a backend runs a node, and why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def profile_options(cls: type, backend: str, profile: Any, overrides: dict[str, Any] | None, ignore: tuple[str, ...] = ()):
    """Build a backend's frozen Options from the profile's ``[backends.<name>]`` table plus overrides."""
    table = {k: v for k, v in dict(getattr(profile, "backends", {}).get(backend, {})).items() if k not in ignore}
    table.update(overrides or {})
    return cls(**{k: v for k, v in table.items() if k in cls.__dataclass_fields__})


def threads_for(requested: int, profile: Any) -> int:
    """Threads to use: the request, else the profile's count, capped at the cores available."""
    import os

    available_cores = len(os.sched_getaffinity(0))
    wanted = requested or int(getattr(profile, "threads", 0) or available_cores)
    return max(1, min(wanted, available_cores))


def require_module(module: str, backend: str, install: str) -> None:
    """Raise BackendUnavailableError naming the pip extra when ``module`` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise BackendUnavailableError(f"The {backend} backend needs the {module} package.", f"Install it: {install}.")


def fix_shapes(model: ir.Model, shapes: dict[str, list[int]]) -> ir.Model:
    """A copy of ``model`` with fixed input shapes and the shape arithmetic folded away.

    For backends that compile for static shapes (TVM, MIGraphX): their importers cannot
    follow the exporter's symbolic shape arithmetic (a ``Range`` over a dynamic length).

    Raises:
        InputMismatchError: An input has no shape in ``shapes``, or its rank differs.
    """
    import onnxscript.optimizer

    fixed = model.clone()
    problems = []
    for value in fixed.graph.inputs:
        if value.is_initializer():
            continue
        shape = shapes.get(value.name)
        if shape is None:
            problems.append(f"'{value.name}' has no fixed shape")
        elif value.shape is not None and len(value.shape) != len(shape):
            problems.append(f"'{value.name}' has rank {len(value.shape)}, the shape given is {list(shape)}")
        else:
            value.shape = ir.Shape([int(d) for d in shape])
    if problems:
        raise InputMismatchError(
            "This backend builds for fixed input shapes: " + "; ".join(problems) + ".",
            "Give them with --backend-option shapes=... or convert with example inputs of the shapes you need.",
        )
    onnxscript.optimizer.optimize(fixed)
    return fixed


def module_of(node: ir.Node) -> str:
    """The ``nn.Module`` path a node came from ('' when unknown)."""
    return node.metadata_props.get("adapter.module", "")


def unsupported_nodes(model: ir.Model, supports: Callable[[ir.Node, ir.Model], Support]) -> list[UnsupportedOp]:
    """Every node ``supports`` refuses, with its module path, in graph order."""
    found = []
    for node in model.graph.all_nodes():
        answer = supports(node, model)
        if not answer:
            found.append(UnsupportedOp(node.name or "", node.op_type, node.domain, module_of(node), answer.reason))
    return found


class EngineBase(abc.ABC):
    """An engine: checked inputs in, named numpy outputs out."""

    backend: str = ""

    runs_here: bool = True
    """False when the engine was built for another machine (a GPU, an ARM board) and
    cannot run on this one; ``stand_in()`` then gives what verification runs instead."""

    def __init__(
        self, folder: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], config: dict[str, Any]
    ) -> None:
        self.folder = Path(folder)
        self.inputs = inputs
        self.outputs = outputs
        self.config = config

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check inputs against the specs (all problems at once), then run the engine."""
        feed = check_inputs(self.inputs, inputs)
        return self._run(feed)

    @abc.abstractmethod
    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on inputs already checked against the specs."""

    def stand_in(self) -> tuple[EngineBase, str] | None:
        """For an engine that does not run here: a runnable engine over the same graph, and
        a one-line description of it for the report (None when there is nothing to run)."""
        return None

    def files(self) -> list[str]:
        """The engine's files, relative to its folder (``config["files"]``)."""
        return list(self.config["files"])

    def save(self, folder: Path) -> None:
        """Copy the engine's files into ``folder`` (a no-op when already there)."""
        import shutil

        folder = Path(folder)
        if folder.resolve() == self.folder.resolve():
            return
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.files():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if (self.folder / name).is_dir():
                shutil.copytree(self.folder / name, target, dirs_exist_ok=True)
            else:
                shutil.copy2(self.folder / name, target)

    @classmethod
    def load(cls, folder: Path) -> EngineBase:
        """Load from an artifact folder (its manifest carries specs and config)."""
        manifest = read_manifest(Path(folder))
        inputs = [TensorSpec.from_json(s) for s in manifest["inputs"]]
        outputs = [TensorSpec.from_json(s) for s in manifest["outputs"]]
        return cls(Path(folder), inputs, outputs, manifest["backend"]["config"])
