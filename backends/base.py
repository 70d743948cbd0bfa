"""The backend contract (:class:`Backend`) and what every backend shares: support
answers, profile options and the engine's checked ``run``."""

from __future__ import annotations

__all__ = [
    "BUILD_OPTIONS", "DEVICES", "Backend", "DecoderBuilder", "DecoderSession", "Support", "EngineBase", "check_backend", "fix_shapes", "unsupported_nodes",
    "module_of", "profile_options", "threads_for", "require_module",
]  # fmt: skip

import abc
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

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


BUILD_OPTIONS = frozenset({"precision", "shapes", "opt_dims"})
"""Option fields the convert driver fills from the build itself: ``precision`` (the precision
plan's compile hint), ``shapes`` (each input's example shape, for fixed-shape builds) and
``opt_dims`` (each dynamic dim's size in the examples, for optimisation profiles)."""
DEVICES = ("cpu", "gpu")


@runtime_checkable
class Backend(Protocol):
    """Everything the rest of adapter asks of a backend.

    A backend is a module of ``backends/`` (or any object) with these names, registered in
    ``adapter.backends.BACKENDS`` by one line of ``backends/__init__.py``. Every list of
    backends elsewhere (precision modes, ``--backend auto``, the profiler, the op library's
    coverage, the CLI's choices, the sharded runtime) is derived from the registry and
    these declarations; nothing probes a backend with ``getattr``.
    """

    NAME: str
    """The name users type (``--backend NAME``) and manifests record."""
    PASSES: tuple[str, ...]
    """Fusion pipeline (names from ``adapter.passes.pipeline``) run on its copy of the canonical graph."""
    PRECISIONS: frozenset[str]
    """Precision modes (``adapter.passes.precision.MODES``) it builds engines for."""
    EMULATES: frozenset[str]
    """Of those, the modes it builds even where the target does not compute them natively."""
    AUTO_KINDS: frozenset[str]
    """Target kinds (``cpu``, ``gpu``) on which it joins ``--backend auto`` when the target lists it."""
    FIXED_SHAPES: bool
    """True when it compiles for fixed input shapes (support is asked of the fixed graph)."""
    BUILD_OPTIONS: frozenset[str]
    """Which of :data:`BUILD_OPTIONS` its ``Options`` take from the build."""
    DEVICE: str
    """Where its engines run: ``cpu`` or ``gpu`` (the sharded runtime picks gloo or NCCL by it)."""
    STAND_IN: bool
    """True when it builds engines for machines other than this one, verified here through
    ``Engine.stand_in()`` (a GPU or ARM engine checked by a CPU run of the same graph)."""
    EXTRA: str
    """The pip extra that installs its SDK ("" when the core dependencies suffice)."""
    DECODER: Any
    """Generation with a KV cache (:class:`DecoderBuilder`: ``build`` an exported decoder into
    an artifact folder, ``load`` a :class:`DecoderSession` from it), or None when the backend
    builds no generation engines."""
    CAPTURE: Callable[..., Any] | None
    """Profiler hook: per-node timings from the backend's own profiler
    (``adapter.backends.profiling.Capture``), or None when it has none."""
    Options: type
    """Its frozen options dataclass, built with ``Options.from_profile(profile, overrides)``."""
    Engine: type[EngineBase]
    """Its engine class (``load``, ``save``, ``run``)."""

    def version(self) -> str:
        """The SDK's version ("not installed" when absent)."""

    def require(self) -> None:
        """Raise BackendUnavailableError, naming the pip extra, when the SDK is missing."""

    def supports(self, node: ir.Node, model: ir.Model, profile: Any = None) -> Support:
        """Whether it runs ``node`` (of ``model``, for ``profile``), and why not."""

    def compile(self, model: ir.Model, profile: Any, options: Any, specs: Any, workdir: Path) -> EngineBase:
        """Build an engine from ``model`` into ``workdir``."""


class DecoderSession(Protocol):
    """One decoder engine's generation state: the KV cache of the running batch.

    ``start`` sizes the cache for ``batch`` rows and up to ``capacity`` positions before
    the first step; ``step`` runs the new tokens of every row (prefill: the prompt; decode:
    one token each) and returns their logits (batch, seq, vocab) as float32, keeping the
    cache inside the session; with ``last_only`` only each row's last position (batch, 1,
    vocab), which an engine may then skip computing for the others.
    """

    def start(self, batch: int, capacity: int) -> None: ...

    def step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, last_only: bool = False
    ) -> np.ndarray: ...


class DecoderBuilder(Protocol):
    """A backend's generation engines (the module in its ``DECODER``)."""

    PASSES: tuple[str, ...]
    """Pass pipelines (``adapter.passes``) run on its copy of the canonical decoder graph."""
    SOURCE: str
    """What ``build`` takes: ``graph`` (its copy of the exported decoder, an ``ir.Model``) or
    ``weights`` (the :class:`~adapter.llm.families.CausalLM`: an engine that brings its own
    graph per architecture, like llama.cpp, needs only the weights and the config)."""
    AUTO_KINDS: frozenset[str]
    """Target kinds on which its generation engines join ``--backend auto`` (when the target
    lists the backend); the backend's own ``AUTO_KINDS`` is about engines from ONNX graphs."""
    WEIGHTS: frozenset[str]
    """Weight formats it builds: ``fp32``, ``bf16``, ``int8``, ``int4``."""
    QUANTIZE_IN_GRAPH: frozenset[str]
    """Of those, the ones the driver realises in the ONNX graph before ``build``."""
    WEIGHT_DEFAULTS: dict[str, Any]
    """Usual ``block_size`` and ``symmetric`` of its INT4/INT8 weights."""

    def prepare(self, model: Any, layout: Any, folder: Path) -> Any:
        """What ``build`` takes at every rung, made once per candidate from ``model`` (see
        ``SOURCE``: the eager model, or the candidate's graph after its passes); scratch files
        go in ``folder``. Most return ``model`` itself; llama.cpp writes its FP32 GGUF there,
        so the eager model can be let go before any engine loads and the INT4 ladder's rungs
        each quantize that one file."""

    def build(self, model: Any, layout: Any, workdir: Path, settings: dict[str, Any]) -> dict[str, Any]:
        """Write the engine's files into ``workdir`` from what ``prepare`` gave (or ``model``
        itself, see ``SOURCE``); returns its config (files, settings)."""

    def load(self, folder: Path, config: dict[str, Any], layout: Any) -> DecoderSession:
        """Open a session over an engine ``build`` wrote."""


def graph_as_is(model: Any, layout: Any, folder: Path) -> Any:
    """``DecoderBuilder.prepare`` of a backend that builds every rung from the graph itself."""
    return model


def check_backend(backend: Any) -> list[str]:
    """What ``backend`` lacks or declares wrongly against :class:`Backend` (empty: conforms)."""
    if not isinstance(backend, Backend):
        return [f"missing {name}" for name in _MEMBERS if not hasattr(backend, name)]
    problems = []
    if not isinstance(backend.NAME, str) or not backend.NAME:
        problems.append("NAME must be a non-empty string")
    if backend.DEVICE not in DEVICES:
        problems.append(f"DEVICE must be one of {DEVICES}, not {backend.DEVICE!r}")
    if not set(backend.AUTO_KINDS) <= set(DEVICES):
        problems.append(f"AUTO_KINDS must be a subset of {DEVICES}")
    if not set(backend.BUILD_OPTIONS) <= BUILD_OPTIONS:
        problems.append(f"BUILD_OPTIONS must be a subset of {sorted(BUILD_OPTIONS)}")
    if not set(backend.EMULATES) <= set(backend.PRECISIONS):
        problems.append("EMULATES must be a subset of PRECISIONS")
    if not dataclasses.is_dataclass(backend.Options) or not hasattr(backend.Options, "from_profile"):
        problems.append("Options must be a dataclass with from_profile(profile, overrides)")
    elif not set(backend.BUILD_OPTIONS) <= {f.name for f in dataclasses.fields(backend.Options)}:
        problems.append("every BUILD_OPTIONS entry must be a field of Options")
    if not (isinstance(backend.Engine, type) and issubclass(backend.Engine, EngineBase)):
        problems.append("Engine must subclass adapter.backends.base.EngineBase")
    if backend.DECODER is not None:
        problems += [f"DECODER lacks {name}" for name in _DECODER_MEMBERS if not hasattr(backend.DECODER, name)]
        if hasattr(backend.DECODER, "SOURCE") and backend.DECODER.SOURCE not in DECODER_SOURCES:
            problems.append(f"DECODER.SOURCE must be one of {DECODER_SOURCES}")
    return problems


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

    def streams(self, count: int = 0) -> list[Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
        """Callables like :meth:`run` that may run at once, one per thread, sharing the
        engine's threads between them (a server runs a batch on each: on few cores one
        thread per stream wastes no time at the barriers of a parallel kernel); ``count`` 0
        is the runtime's own choice for throughput. The engine's :meth:`run` then shares
        the first stream. An engine that cannot run concurrently has one: itself."""
        return [self.run]

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


DECODER_SOURCES = ("graph", "weights")
_DECODER_MEMBERS = (*DecoderBuilder.__annotations__, "prepare", "build", "load")
_MEMBERS = tuple(
    name for name in (*Backend.__annotations__, "version", "require", "supports", "compile") if not name.startswith("_")
)
