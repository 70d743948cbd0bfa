"""MIGraphX backend (AMD GPUs): ONNX Runtime with its MIGraphX execution provider.

ONNX Runtime's ROCm execution provider was removed upstream; MIGraphX is the AMD provider.
Compiling writes ``model.onnx`` (standard domain only, opset ≤ 20), ``ort_providers.json``
(the provider list and the MIGraphX provider options) and ``run_on_rocm.py`` (creates the
session with those providers). Where this onnxruntime lists ``MIGraphXExecutionProvider``
among its available providers, the engine runs through it; elsewhere ``runs_here`` is False
and ``stand_in()`` gives ONNX Runtime's CPU provider over the same ``model.onnx``.

Provider option names are those ONNX Runtime's MIGraphX provider parses, read in
``onnxruntime/core/providers/migraphx/migraphx_execution_provider_info.{h,cc}`` (microsoft/onnxruntime
at commit 03c125006fc8276159753be0cc577fc0e6b4551d): ``device_id``, ``migraphx_fp16_enable``,
``migraphx_bf16_enable``, ``migraphx_fp8_enable``, ``migraphx_int8_enable``,
``migraphx_exhaustive_tune``, ``migraphx_mem_limit``, ``migraphx_model_cache_dir``. Booleans
are passed as "0"/"1" (what the provider's own ``ToProviderOptions`` writes). Older releases
named the cache ``migraphx_save_compiled_model``/``migraphx_save_model_path`` (the C struct
``OrtMIGraphXProviderOptions``); the parser rejects unknown keys, so only current names are written.
"""

from __future__ import annotations

__all__ = ["NAME", "PASSES", "PROVIDER", "Options", "version", "require", "supports", "compile", "Engine"]

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends._kernels import attach_kernels, example_sizes
from adapter.backends._recipe import (
    check_onnx,
    cpu_stand_in,
    documented_support,
    prepare_graph,
    standard_domain_problems,
    write_atomic,
)
from adapter.backends.base import EngineBase, Support, fix_shapes, profile_options, require_module, unsupported_nodes
from adapter.backends.documented import MIGRAPHX
from adapter.core import safety as _safety
from adapter.core.errors import AdapterError, UnsupportedOpsError
from adapter.core.onnx_io import save_model
from adapter.core.specs import TensorSpec

NAME = "migraphx"
FIXED_SHAPES = True
"""MIGraphX compiles a program per input shape: the graph is specialised to ``Options.shapes``
(the example inputs' by default), which also folds the exporter's dynamic ``Range`` lengths
that its parser refuses."""
PROVIDER = "MIGraphXExecutionProvider"
PASSES = ()
"""No fusion pipeline: MIGraphX fuses on its own, and the graph stays in the standard domain."""
PRECISIONS = frozenset({"fp32", "fp16", "int8"})
"""Precision modes it builds (the contract: ``adapter.backends.base.Backend``)."""
EMULATES = frozenset()
AUTO_KINDS = frozenset({"cpu", "gpu"})
BUILD_OPTIONS = frozenset({"precision", "shapes"})
DEVICE = "gpu"
STAND_IN = True
EXTRA = ""
MODEL_FILE = "model.onnx"
PROVIDERS_FILE = "ort_providers.json"
RUN_FILE = "run_on_rocm.py"
CACHE_DIR = "migraphx-cache"
"""Compiled-program cache, inside the artifact (made absolute at session creation)."""


@dataclass(frozen=True)
class Options:
    """MIGraphX provider settings; defaults come from the profile's ``[backends.migraphx]`` table."""

    precision: str = "fp32"
    """Precision hint: fp32, fp16 or bf16 (MIGraphX lowers the FP32 graph itself)."""
    device_id: int = 0
    """HIP device the session runs on."""
    int8: bool = False
    """MIGraphX's own INT8 quantization (calibration-table based); graphs with Q/DQ do not need it."""
    fp8: bool = False
    """MIGraphX's own FP8 quantization; graphs with Q/DQ do not need it."""
    exhaustive_tune: bool = False
    """Let MIGraphX time every kernel candidate while compiling (slower compile, faster run)."""
    model_cache: bool = True
    """Keep MIGraphX's compiled programs in the artifact's migraphx-cache folder."""
    mem_limit: int = 0
    """Device memory limit of the provider's arena in bytes (0: no limit)."""
    shapes: dict[str, list[int]] | None = None
    """Fixed input shapes the program is compiled for (default: the example inputs')."""

    @classmethod
    def from_profile(cls, profile: Any, overrides: dict[str, Any] | None = None) -> Options:
        return profile_options(cls, NAME, profile, overrides)


def require() -> None:
    """ONNX Runtime is needed for the stand-in (and, with the provider, the engine)."""
    require_module("onnxruntime", NAME, "pip install onnxruntime==1.32.0 (onnxruntime-migraphx on a ROCm machine)")


def version() -> str:
    """ONNX Runtime's version, with whether it has the MIGraphX provider."""
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} ({'with' if _available() else 'without'} {PROVIDER})"


def _available() -> bool:
    import onnxruntime as ort

    return PROVIDER in ort.get_available_providers()


def supports(node: ir.Node, model: ir.Model, profile: Any = None) -> Support:
    """Whether MIGraphX's ONNX parser takes the node, per AMD's operator matrix (standard domain only)."""
    return documented_support(
        node,
        MIGRAPHX,
        f"the {NAME} backend keeps the graph in the standard domain (its CPU stand-in must run the same graph); "
        f"'{node.domain}' ops are not written",
    )


def provider_options(options: Options, folder: Path | None = None) -> dict[str, str]:
    """The MIGraphX provider options; the cache folder is made absolute under ``folder`` when given."""
    flag = {True: "1", False: "0"}
    table = {
        "device_id": str(int(options.device_id)),
        "migraphx_fp16_enable": flag[options.precision == "fp16"],
        "migraphx_bf16_enable": flag[options.precision == "bf16"],
        "migraphx_fp8_enable": flag[bool(options.fp8)],
        "migraphx_int8_enable": flag[bool(options.int8)],
        "migraphx_exhaustive_tune": flag[bool(options.exhaustive_tune)],
    }
    if options.mem_limit:
        table["migraphx_mem_limit"] = str(int(options.mem_limit))
    if options.model_cache:
        table["migraphx_model_cache_dir"] = str(Path(folder) / CACHE_DIR) if folder else CACHE_DIR
    return table


_RUN_SCRIPT = '''\
#!/usr/bin/env python3
"""Run this artifact's model.onnx with ONNX Runtime's MIGraphX provider on an AMD GPU.

Generated by adapter. Needs an onnxruntime build with MIGraphXExecutionProvider (AMD's ROCm
wheels). Usage:

    python run_on_rocm.py                      # create the session, print its providers
    python run_on_rocm.py inputs.npz out.npz   # run on the arrays in inputs.npz
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
CONFIG = json.loads((HERE / "ort_providers.json").read_text())


def make_session():
    providers, options = CONFIG["providers"], [dict(o) for o in CONFIG["provider_options"]]
    for entry in options:
        for key in CONFIG["paths_relative_to_artifact"]:
            if key in entry:
                (HERE / entry[key]).mkdir(parents=True, exist_ok=True)
                entry[key] = str(HERE / entry[key])
    if providers[0] not in ort.get_available_providers():
        sys.exit(f"This onnxruntime has no {{providers[0]}} (it has {{ort.get_available_providers()}}).")
    return ort.InferenceSession(str(HERE / {model!r}), providers=providers, provider_options=options)


def main(argv):
    session = make_session()
    print("providers:", session.get_providers())
    if len(argv) == 3:
        with np.load(argv[1], allow_pickle=False) as data:
            feed = {{name: data[name] for name in data.files}}
        names = [o.name for o in session.get_outputs()]
        np.savez(argv[2], **dict(zip(names, session.run(names, feed))))
        print("wrote", argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
'''


def compile(
    model: ir.Model, profile: Any, options: Options, specs: tuple[list[TensorSpec], list[TensorSpec]], workdir: Path
) -> Engine:
    """Write the standard-domain ONNX, the provider configuration and the ROCm run script.

    Raises:
        UnsupportedOpsError: Nodes MIGraphX's parser would refuse, or non-standard-domain ops.
        AdapterError: An unknown precision.
    """
    if options.precision not in ("fp32", "fp16", "bf16"):
        raise AdapterError(f"Unknown MIGraphX precision hint '{options.precision}'.", "Use fp32, fp16 or bf16.")
    graph = prepare_graph(fix_shapes(model, options.shapes) if options.shapes else model)
    refused = standard_domain_problems(graph, f"the {NAME} backend writes standard-domain ONNX only")
    refused += [
        p for p in unsupported_nodes(graph, lambda n, m: supports(n, m, profile)) if p.domain in ("", "ai.onnx")
    ]
    if refused:
        raise UnsupportedOpsError(NAME, refused)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = save_model(graph, workdir / MODEL_FILE)
    check_onnx(workdir / MODEL_FILE)
    providers = {
        "providers": [PROVIDER, "CPUExecutionProvider"],
        "provider_options": [provider_options(options), {}],
        "paths_relative_to_artifact": ["migraphx_model_cache_dir"],
        "requires": "an onnxruntime build with MIGraphXExecutionProvider (AMD ROCm wheels)",
        "option_names_from": (
            "https://github.com/microsoft/onnxruntime/blob/03c125006fc8276159753be0cc577fc0e6b4551d/"
            "onnxruntime/core/providers/migraphx/migraphx_execution_provider_info.h"
        ),
    }
    write_atomic(workdir / PROVIDERS_FILE, json.dumps(providers, indent=2) + "\n")
    write_atomic(workdir / RUN_FILE, _RUN_SCRIPT.format(model=MODEL_FILE))
    kernels = attach_kernels(graph, profile, example_sizes(specs[0], dict(options.shapes or {})), options.precision,
                             workdir)  # fmt: skip
    here = _available()
    config: dict[str, Any] = {
        **asdict(options),
        **kernels,
        "providers": providers["providers"],
        "provider_options": providers["provider_options"][0],
        "ort_version": version(),
        "session_here": here,
        "files": files + [PROVIDERS_FILE, RUN_FILE] + [f for k in kernels.get("triton_kernels", []) for f in k["files"]],
        "note": (
            f"The session runs on {PROVIDER} here."
            if here
            else f"No MIGraphX session was created: this onnxruntime has no {PROVIDER}. "
            f"Run it on the ROCm machine with: python {RUN_FILE}."
        ),
    }
    inputs = [
        TensorSpec(s.name, s.dtype, tuple(options.shapes[s.name])) if options.shapes and s.name in options.shapes else s
        for s in specs[0]
    ]
    return Engine(workdir, inputs, specs[1], config)


class Engine(EngineBase):
    """An ONNX Runtime session on the MIGraphX provider where it exists; elsewhere a CPU stand-in."""

    backend = NAME

    def __init__(
        self, folder: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], config: dict[str, Any]
    ) -> None:
        super().__init__(folder, inputs, outputs, config)
        self.runs_here = _available()
        self.session = None
        if self.runs_here:
            self.session = self._session()
            self.output_names = [o.name for o in self.session.get_outputs()]

    def _session(self):
        import onnxruntime as ort

        fields = set(Options.__dataclass_fields__)
        options = Options(**{k: v for k, v in self.config.items() if k in fields})
        table = provider_options(options, self.folder)
        if "migraphx_model_cache_dir" in table:
            Path(table["migraphx_model_cache_dir"]).mkdir(parents=True, exist_ok=True)
        path = self.folder / MODEL_FILE
        _safety.check_onnx_file(path)
        try:
            return ort.InferenceSession(
                str(path), providers=[PROVIDER, "CPUExecutionProvider"], provider_options=[table, {}]
            )
        except Exception as exc:
            raise AdapterError(
                f"ONNX Runtime could not create a MIGraphX session for '{path}': {str(exc).splitlines()[0][:400]}",
                "Check the ROCm install (rocminfo) and the provider options in ort_providers.json.",
            ) from exc

    def stand_in(self) -> tuple[EngineBase, str] | None:
        if self.runs_here:
            return None
        return cpu_stand_in(self.folder, self.inputs, self.outputs, MODEL_FILE, f"{PROVIDER} would run")

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise AdapterError(
                self.config.get("note") or f"This onnxruntime has no {PROVIDER}.",
                "Run it on the ROCm machine, or verify with the engine's stand-in (ONNX Runtime CPU, same model.onnx).",
            )
        try:
            results = self.session.run(self.output_names, feed)
        except Exception as exc:
            raise AdapterError(f"MIGraphX failed while running the engine: {str(exc).splitlines()[0][:400]}") from exc
        return dict(zip(self.output_names, results))


CAPTURE = None
DECODER = None  # no generation engines yet
"""The profiler hook (None: this backend's engines cannot be profiled per node)."""
