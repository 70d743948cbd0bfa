"""ONNX Runtime Mobile backend for ARM edge boards: the ORT format (``.ort``).

Compiling writes the passes' ONNX and converts it with ONNX Runtime's own tool
(``onnxruntime.tools.convert_onnx_models_to_ort``, run in a subprocess so a crash in it
cannot take the CLI down) for the profile's target platform. The artifact keeps
``model.ort`` (a flatbuffer that both full and minimal ONNX Runtime builds load without
protobuf) and the reduced-operator configuration the tool writes, which is what a
minimal ONNX Runtime build for the board takes with ``--include_ops_by_config``.

The engine is built for aarch64 (``runs_here = False``). On this machine verification
runs through :meth:`Engine.stand_in`, an ONNX Runtime CPU session over the same
``.ort`` file; :meth:`Engine.run_arm64` runs it on an emulated ARM64 machine
(:mod:`adapter.backends._arm64`).
"""

from __future__ import annotations

__all__ = [
    "NAME", "PASSES", "Options", "version", "require", "supports", "compile", "Engine", "HostEngine", "DECODER",
    "generate_arm64",
]  # fmt: skip

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends import _arm64
from adapter.backends import onnxruntime as ort_backend
from adapter.backends._ort_decoder import OrtDecoder
from adapter.backends.base import EngineBase, Support, graph_as_is, profile_options, require_module, threads_for
from adapter.core.errors import AdapterError
from adapter.core.onnx_io import initializer_bytes, save_model
from adapter.core.specs import TensorSpec, check_inputs

NAME = "edge"
PASSES = ("fusion-ort",)
PRECISIONS = frozenset({"fp32", "fp16", "int8", "int8-dynamic"})
"""Precision modes it builds (the contract: ``adapter.backends.base.Backend``)."""
EMULATES = frozenset()
AUTO_KINDS = frozenset({"cpu", "gpu"})
FIXED_SHAPES = False
BUILD_OPTIONS = frozenset()
DEVICE = "cpu"
STAND_IN = True
EXTRA = ""
"""ONNX Runtime's fusion pipeline: the ORT format keeps com.microsoft ops (Attention,
SkipLayerNormalization, DynamicQuantizeMatMul, ...) and ONNX Runtime Mobile runs them."""
ORT_FILE = "model.ort"
CONFIG_FILE = "required_operators.config"
"""The reduced-operator configuration in the artifact (for a minimal ONNX Runtime build)."""
ORT_MAGIC = b"ORTM"
"""Flatbuffer file identifier of ORT format models (bytes 4-8)."""

_STYLES = ("Fixed", "Runtime")
_PLATFORMS = ("arm", "amd64")
_FORMATS = ("ort",)
_ARCH = {"arm": "aarch64", "amd64": "x86_64"}
_CONVERT_TIMEOUT = 1800


@dataclass(frozen=True)
class Options:
    """ORT-format conversion settings; defaults come from the profile's ``[backends.edge]``."""

    format: str = "ort"
    """Engine format; only ``ort`` (ONNX Runtime Mobile) so far."""
    optimization_style: str = "Fixed"
    """``Fixed`` bakes the graph optimisations into the file; ``Runtime`` saves some to replay at load."""
    target_platform: str = "arm"
    """Platform-specific conversion choices: ``arm`` (int8 Q/DQ allowed, no NCHWc) or ``amd64``."""
    type_reduction: bool = False
    """Record per-op types in the operator configuration (a smaller minimal build)."""
    threads: int = 0
    """Intra-op threads for the stand-in on this machine; 0 means the profile's count, capped."""

    @classmethod
    def from_profile(cls, profile: Any, overrides: dict[str, Any] | None = None) -> Options:
        return profile_options(cls, NAME, profile, overrides)


def require() -> None:
    """Raise a clear error when onnxruntime (which carries the ORT-format converter) is missing."""
    require_module("onnxruntime", NAME, "pip install onnxruntime==1.32.0")


def version() -> str:
    return ort_backend.version()


def supports(node: ir.Node, model: ir.Model, profile: Any = None) -> Support:
    """Whether ONNX Runtime has a CPU kernel for the node (the ARM build has the same operator set)."""
    return ort_backend.supports(node, model, profile)


def _check_options(options: Options) -> None:
    for field, value, allowed in (
        ("format", options.format, _FORMATS),
        ("optimization_style", options.optimization_style, _STYLES),
        ("target_platform", options.target_platform, _PLATFORMS),
    ):
        if value not in allowed:
            raise AdapterError(
                f"Unknown edge backend {field} '{value}'.",
                f"Use one of {', '.join(allowed)} in the profile's [backends.edge] table.",
            )


def _convert(onnx_path: Path, out_dir: Path, options: Options) -> None:
    """Run ONNX Runtime's ORT-format converter on one ONNX file, in a subprocess."""
    cmd = [
        sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
        "--optimization_style", options.optimization_style,
        "--target_platform", options.target_platform,
        "--output_dir", str(out_dir),
    ]
    if options.type_reduction:
        cmd.append("--enable_type_reduction")
    env = {k: v for k, v in os.environ.items() if k != "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"}
    hint = "Run `adapter check --backend edge` on the source to see which nodes ONNX Runtime refuses."
    try:
        done = subprocess.run([*cmd, str(onnx_path)], capture_output=True, text=True, env=env,
                              timeout=_CONVERT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise AdapterError(f"ONNX Runtime's ORT-format converter did not finish within {_CONVERT_TIMEOUT} s.",
                           hint) from exc
    if done.returncode != 0:
        lines = [line for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()]
        what = f"crashed (signal {-done.returncode})" if done.returncode < 0 else f"failed (exit {done.returncode})"
        raise AdapterError(f"ONNX Runtime's ORT-format converter {what}: {' | '.join(lines[-8:])[:1200]}", hint)


def _relative_config(text: str) -> str:
    """The operator configuration with the converter's absolute paths cut to file names."""
    lines = []
    for line in text.splitlines():
        if line.startswith("# - "):
            line = "# - " + Path(line[4:].strip()).name
        lines.append(line)
    return "\n".join(lines) + "\n"


def check_ort_file(path: Path) -> None:
    """Refuse a file that is not an ORT format model (before handing it to ONNX Runtime)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise AdapterError(f"Cannot read the ORT model '{path}': {exc}.") from exc
    if len(head) < 8 or head[4:8] != ORT_MAGIC:
        raise AdapterError(f"'{path}' is not an ORT format model (no ORTM identifier).",
                           "Rebuild the engine with the edge backend.")


def _to_ort(model: ir.Model, workdir: Path, name: str, options: Options) -> tuple[int, str]:
    """Save ``model``, convert it to ``workdir/name`` (ORT format) and write the operator
    configuration beside it; return the ONNX bytes and the name the tool gave the config."""
    scratch = Path(tempfile.mkdtemp(prefix=".edge-", dir=workdir))
    try:
        onnx_files = save_model(model, scratch / "model.onnx")
        onnx_bytes = sum((scratch / f).stat().st_size for f in onnx_files)
        _convert(scratch / "model.onnx", scratch / "out", options)
        converted = sorted((scratch / "out").glob("*.ort"))
        configs = sorted((scratch / "out").glob("*.config"))
        if len(converted) != 1 or len(configs) != 1:
            found = ", ".join(p.name for p in (scratch / "out").iterdir())
            raise AdapterError(f"ONNX Runtime's converter wrote unexpected files ({found}).",
                               f"Check the onnxruntime version ({version()}).")
        check_ort_file(converted[0])
        (scratch / "out" / CONFIG_FILE).write_text(_relative_config(configs[0].read_text()))
        os.replace(converted[0], workdir / name)
        os.replace(scratch / "out" / CONFIG_FILE, workdir / CONFIG_FILE)
        return onnx_bytes, configs[0].name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compile(
    model: ir.Model, profile: Any, options: Options, specs: tuple[list[TensorSpec], list[TensorSpec]], workdir: Path
) -> Engine:
    """Convert the model to ORT format for the profile's platform; keep the ``.ort`` and operator config."""
    _check_options(options)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_bytes, tool_config_name = _to_ort(model, workdir, ORT_FILE, options)
    ops = [line for line in (workdir / CONFIG_FILE).read_text().splitlines() if line and not line.startswith("#")]
    config: dict[str, Any] = {
        **asdict(options),
        "threads": threads_for(options.threads, profile),
        "files": [ORT_FILE, CONFIG_FILE],
        "ort_file": ORT_FILE,
        "operator_config": CONFIG_FILE,
        "operator_config_written_as": tool_config_name,
        "operators": ops,
        "ort_version": version(),
        "arch": _ARCH[options.target_platform],
        "core": str(getattr(profile, "arch", "") or ""),
        "sizes": {
            "onnx_bytes": onnx_bytes,
            "ort_bytes": (workdir / ORT_FILE).stat().st_size,
            "weights_bytes": initializer_bytes(model),
            "operator_config_bytes": (workdir / CONFIG_FILE).stat().st_size,
        },
    }
    return Engine(workdir, specs[0], specs[1], config)


class HostEngine(EngineBase):
    """ONNX Runtime's CPU provider on this machine over an artifact's ``.ort`` file."""

    backend = "onnxruntime"

    def __init__(
        self, folder: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], config: dict[str, Any]
    ) -> None:
        import onnxruntime as ort

        super().__init__(folder, inputs, outputs, config)
        path = self.folder / config.get("ort_file", ORT_FILE)
        check_ort_file(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads_for(config.get("threads", 0), None)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if config.get("optimization_style") == "Runtime":
            opts.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
        try:
            # NCHWc is x86-only: leave it out so the stand-in runs the graph the ARM board runs.
            self.session = ort.InferenceSession(
                str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"]
            )
        except Exception as exc:
            raise AdapterError(
                f"ONNX Runtime could not load the ORT model '{path}': {str(exc).splitlines()[0][:400]}",
                "Rebuild the engine with this onnxruntime version.",
            ) from exc
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(self.output_names, feed)
        except Exception as exc:
            raise AdapterError(f"ONNX Runtime failed while running the ORT model: {str(exc).splitlines()[0][:400]}"
                               ) from exc
        return dict(zip(self.output_names, results))


class Engine(EngineBase):
    """An ORT format model for an ARM board; runs here only through its stand-in or under emulation."""

    backend = NAME
    runs_here = False

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arch = self.config.get("arch", "aarch64")
        raise AdapterError(
            f"This edge engine is built for {arch} (ONNX Runtime Mobile, ORT format) and does not run on this machine.",
            "Run it on the board, under emulation with Engine.run_arm64() "
            "(adapter.backends._arm64.run_artifact), or here through Engine.stand_in().",
        )

    def stand_in(self) -> tuple[EngineBase, str]:
        engine = HostEngine(self.folder, self.inputs, self.outputs, self.config)
        return engine, f"ONNX Runtime {version()} CPU on this x86 host, same .ort file"

    def run_arm64(
        self,
        inputs: dict[str, np.ndarray],
        rootfs: Path | None = None,
        timeout: float = 600,
        info: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the ``.ort`` file with ONNX Runtime on an emulated ARM64 machine (slow; for checks).

        QEMU emulates the profile's core when it knows it (cortex-a76 for the Pi 5)."""
        feed = check_inputs(self.inputs, inputs)
        root = _arm64.ensure_rootfs(rootfs)
        spec = {
            "kind": "ort",
            "model": self.config.get("ort_file", ORT_FILE),
            "inputs": [s.name for s in self.inputs],
            "outputs": [s.name for s in self.outputs],
        }
        cpu = _arm64.qemu_cpu(self.config.get("core"))
        return _arm64.run_artifact(root, self.folder, spec, feed, timeout, cpu=cpu, info=info)


CAPTURE = None
"""The profiler hook (None: this backend's engines cannot be profiled per node)."""

DECODER_FILE = "decoder.ort"


class _Decoder:
    """Generation engines for ARM boards (the ``DecoderBuilder`` contract).

    The exported decoder as it is (plain ONNX ops; the graph concatenates each layer's past
    and new keys/values into ``present``), weight-only INT4/INT8 as ``MatMulNBits``,
    converted to the ORT format like the encoders. On this machine the same ``.ort`` file
    runs as the stand-in (:class:`~adapter.backends._ort_decoder.OrtDecoder`, cache
    ``concat``); :func:`generate_arm64` decodes with it on the emulated ARM64 machine.
    """

    PASSES: tuple[str, ...] = ()
    SOURCE = "graph"
    AUTO_KINDS = frozenset({"cpu", "gpu"})
    WEIGHTS = frozenset({"fp32", "int8", "int4"})
    QUANTIZE_IN_GRAPH = frozenset({"int8", "int4"})
    WEIGHT_DEFAULTS = {"block_size": 32, "symmetric": True}

    prepare = staticmethod(graph_as_is)

    @staticmethod
    def build(model: ir.Model, layout: Any, workdir: Path, settings: dict[str, Any]) -> dict[str, Any]:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        _to_ort(model, workdir, DECODER_FILE, Options())
        return {"model_file": DECODER_FILE, "files": [DECODER_FILE, CONFIG_FILE], "kv_cache": "concat",
                "arch": _ARCH["arm"], **settings}  # fmt: skip

    @staticmethod
    def load(folder: Path, config: dict[str, Any], layout: Any) -> OrtDecoder:
        return OrtDecoder(folder, config, layout, vet=check_ort_file)


DECODER = _Decoder


def generate_arm64(
    folder: Path,
    config: dict[str, Any],
    layout: Any,
    prompt: list[int],
    steps: int,
    rootfs: Path | None = None,
    timeout: float = 600,
    info: dict[str, Any] | None = None,
) -> list[int]:
    """Greedy tokens of an edge decoder engine on the emulated ARM64 machine (slow; for checks)."""
    spec = {
        "kind": "ort-generate",
        "model": config["model_file"],
        "inputs": ["prompt"],
        "outputs": ["tokens"],
        "generate": {"past": layout.past_names(), "present": layout.present_names(),
                     "cache": [layout.kv_heads, layout.head_dim], "steps": int(steps)},
    }  # fmt: skip
    root = _arm64.ensure_rootfs(rootfs)
    out = _arm64.run_artifact(root, Path(folder), spec, {"prompt": np.asarray(prompt, np.int64)}, timeout, info=info)
    return [int(t) for t in out["tokens"]]
