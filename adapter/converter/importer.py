"""Import a model source into an ``onnx_ir.Model`` plus an eager reference.

Sources:
    * a Python factory, ``path/to/file.py:make_model`` or ``pkg.module:attr``, returning
      ``(module, example_inputs)`` or ``(module, example_inputs, dynamic)``;
    * a local Hugging Face folder (``config.json`` + safetensors weights);
    * a ``.pt2`` ExportedProgram (inspected first: it may unpickle);
    * an ``.onnx`` file (external data checked to stay in its folder).

A factory file is code the user chose to run; pickled checkpoints (``.pt``, ``.pth``,
``.bin``, ``.pkl``) are never opened as sources.
"""

from __future__ import annotations

__all__ = ["ImportedModel", "PreparedSource", "import_source", "prepare_source", "source_kind"]

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapter.converter.imported import ImportedModel
from adapter.converter.onnx_source import import_onnx, onnx_digest, source_files
from adapter.converter.torch_export import (
    broaden_examples,
    export_program,
    flatten_outputs,
    name_outputs,
    rename_symbols,
    symbol_dims,
    to_numpy,
    to_onnx,
)
from adapter.core import reads as _reads
from adapter.core import safety as _safety
from adapter.core.errors import SourceError, UnsafeSourceError
from adapter.core.specs import Dim, TensorSpec, spec_of

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
_MODULE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def source_kind(spec: str) -> str:
    """Classify a source string: ``factory``, ``hf``, ``pt2`` or ``onnx``."""
    path = Path(spec)
    lower = spec.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise UnsafeSourceError(
            f"'{spec}' is a pickled checkpoint; adapter never unpickles model files because "
            "unpickling can run arbitrary code.",
            "Export the model with torch.export.save() to a .pt2, save weights as safetensors "
            "in a Hugging Face folder, or write a factory file that builds the module and "
            "loads weights with torch.load(weights_only=True).",
        )
    if lower.endswith((".onnx", ".pt2")):
        if not path.is_file():
            raise SourceError(f"'{spec}' does not exist.", "Check the path of the model file.")
        return "onnx" if lower.endswith(".onnx") else "pt2"
    if path.is_dir():
        return "hf"
    head, sep, _ = spec.rpartition(":")
    if sep and (head.endswith(".py") or _MODULE_SPEC.match(spec)):
        return "factory"
    if path.exists():
        raise SourceError(
            f"'{spec}' is not a model source adapter knows.",
            "Give an .onnx or .pt2 file, a Hugging Face folder, or a factory as "
            "path/to/file.py:function or package.module:function.",
        )
    raise SourceError(
        f"'{spec}' does not exist.",
        "Give an .onnx or .pt2 file, a Hugging Face folder, or a factory as "
        "path/to/file.py:function or package.module:function.",
    )


def _sha256_files(paths: list[Path], base: Path | None = None) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(base) if base else path.name).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def load_factory(spec: str) -> Callable[[], Any]:
    head, _, attr = spec.rpartition(":")
    if head.endswith(".py"):
        path = Path(head)
        if not path.is_file():
            raise SourceError(f"Factory file '{head}' does not exist.", "Check the path before the ':'.")
        name = f"_adapter_factory_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise SourceError(f"'{head}' cannot be imported as a Python file.")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise SourceError(f"Importing factory file '{head}' failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(head)
        except ImportError as exc:
            raise SourceError(
                f"Cannot import module '{head}' named in '{spec}': {exc}.",
                "Check the module path and that its package is installed.",
            ) from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            public = sorted(n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_"))
            raise SourceError(
                f"'{spec}' names no callable: '{head}' has no attribute '{attr}'.",
                f"Callables it defines: {', '.join(public[:12]) or 'none'}.",
            )
        target = getattr(target, part)
    if not callable(target):
        raise SourceError(
            f"'{spec}' names {type(target).__name__} '{attr}', not a callable.",
            "Point at a function that returns (module, example_inputs).",
        )
    return target


def _normalise_factory_result(spec: str, result: Any):
    import torch

    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise SourceError(
            f"Factory '{spec}' returned {type(result).__name__}; expected (module, example_inputs) "
            "or (module, example_inputs, dynamic)."
        )
    module, inputs = result[0], result[1]
    dynamic = result[2] if len(result) == 3 else {}
    if not isinstance(module, torch.nn.Module):
        raise SourceError(
            f"Factory '{spec}' returned {type(module).__name__} as its model; expected a torch.nn.Module."
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, (tuple, list)):
        params = [
            p
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) < len(inputs):
            raise SourceError(f"Factory '{spec}' gave {len(inputs)} example inputs but forward() takes {len(params)}.")
        inputs = {p.name: v for p, v in zip(params, inputs)}
    if not isinstance(inputs, dict) or not all(isinstance(v, torch.Tensor) for v in inputs.values()):
        raise SourceError(f"Factory '{spec}' example inputs must be tensors (a tuple or a dict of name to tensor).")
    dims = {
        name: {int(axis): d if isinstance(d, Dim) else Dim(str(d)) for axis, d in axes.items()}
        for name, axes in dynamic.items()
    }
    return module.eval(), inputs, dims


def _module_digest(spec: str, module, inputs, dynamic) -> str:
    """Hash everything that defines a torch model: weights, structure, code, examples."""
    import torch

    digest = hashlib.sha256(spec.encode())
    digest.update(repr(module).encode())
    code_files = set()
    for sub in module.modules():
        try:
            code_files.add(inspect.getsourcefile(type(sub)))
        except TypeError:
            pass
    head = spec.rpartition(":")[0]
    if head.endswith(".py"):
        code_files.add(str(Path(head).resolve()))
    for path in sorted(p for p in code_files if p):
        digest.update(Path(path).read_bytes())
    for name, tensor in list(module.state_dict(keep_vars=False).items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for name, tensor in inputs.items():
        digest.update(name.encode() + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(to_numpy(tensor).tobytes())
    digest.update(repr(sorted((k, sorted(v.items())) for k, v in dynamic.items())).encode())
    return digest.hexdigest()


def _tensors(result) -> dict:
    return {k: v for k, v in result.items() if v is not None and hasattr(v, "shape")}


def _hf_wrappers():
    import torch

    class TextModel(torch.nn.Module):
        """A Hugging Face text model returning a plain dict of its tensor outputs."""

        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask):
            return _tensors(self.model(input_ids=input_ids, attention_mask=attention_mask))

    class VisionModel(torch.nn.Module):
        """A Hugging Face vision model returning a plain dict of its tensor outputs."""

        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, pixel_values):
            return _tensors(self.model(pixel_values=pixel_values))

    return TextModel, VisionModel


def _hf_model(folder: Path):
    """Build a module + example inputs from a local Hugging Face folder, offline."""
    import torch

    if not (folder / "config.json").is_file():
        raise SourceError(f"Folder '{folder}' has no config.json, so it is not a Hugging Face model folder.")
    weights = list(folder.glob("*.safetensors"))
    if not weights:
        raise UnsafeSourceError(
            f"Folder '{folder}' has no safetensors weights.",
            "adapter loads Hugging Face weights only from safetensors; convert pickled "
            "pytorch_model.bin files with the safetensors tools first.",
        )
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    with _safety.weights_only_loads():
        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            model = AutoModel.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, attn_implementation="eager"
            )
        except Exception as exc:
            raise SourceError(f"transformers could not load '{folder}': {exc}") from exc
    torch.manual_seed(0)
    if hasattr(config, "vocab_size") and not hasattr(config, "image_size"):
        ids = torch.randint(0, config.vocab_size, (2, 16))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        dynamic = {
            k: {0: Dim("batch"), 1: Dim("seq", 1, getattr(config, "max_position_embeddings", 512))} for k in inputs
        }
    elif hasattr(config, "image_size"):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        inputs = {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size)}
        dynamic = {"pixel_values": {0: Dim("batch")}}
    else:
        raise SourceError(
            f"Cannot tell what inputs the model in '{folder}' takes.",
            "Write a factory file that returns the model with example inputs.",
        )

    text_model, vision_model = _hf_wrappers()
    wrapper = (text_model if "input_ids" in inputs else vision_model)(model).eval()
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        wrapper.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return wrapper, inputs, dynamic


def _torch_reference(module, output_names: list[str]):
    import torch

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            result = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
        return {name: to_numpy(t) for name, (_, t) in zip(output_names, flatten_outputs(result))}

    return run


def _specs_from_graph(values, sym: dict[str, Dim]) -> list[TensorSpec]:
    by_name = {d.name: d for d in sym.values()}
    return [spec_of(value, by_name) for value in values]


def import_torch(spec: str, kind: str, module, inputs, dynamic, digest: str, seconds: dict) -> ImportedModel:
    inputs = broaden_examples(inputs, dynamic)
    start = time.perf_counter()
    program = export_program(module, inputs, dynamic)
    seconds["torch_export"] = time.perf_counter() - start
    return _from_program(spec, kind, program, module, inputs, dynamic, digest, seconds)


def _from_program(spec, kind, program, module, inputs, dynamic, digest, seconds) -> ImportedModel:
    import torch

    start = time.perf_counter()
    model = to_onnx(program, inputs)
    seconds["onnx_export"] = time.perf_counter() - start
    with torch.no_grad():
        names = [name for name, _ in flatten_outputs(module(**inputs))]
    name_outputs(model, names)
    sym = symbol_dims(program, dynamic)
    rename_symbols(model, sym)
    return ImportedModel(
        model=model,
        kind=kind,
        source=spec,
        digest=digest,
        inputs=_specs_from_graph(model.graph.inputs, sym),
        outputs=_specs_from_graph(model.graph.outputs, sym),
        example_inputs={k: to_numpy(v) for k, v in inputs.items()},
        reference=_torch_reference(module, names),
        reference_kind="eager PyTorch",
        seconds=seconds,
        tokenizer=getattr(module, "tokenizer", None),
    )


def _import_pt2(path: Path, trust_source: bool, digest: str, seconds: dict) -> ImportedModel:
    import torch

    start = time.perf_counter()
    try:
        if trust_source:
            program = torch.export.load(str(path))
        else:
            with _safety.weights_only_loads():
                program = torch.export.load(str(path))
    except Exception as exc:
        raise SourceError(
            f"torch.export.load could not read '{path}': {type(exc).__name__}: {exc}",
            "Re-save it with torch.export.save() from the same torch version.",
        ) from exc
    seconds["load"] = time.perf_counter() - start
    args, kwargs = program.example_inputs or ((), {})
    names = program.graph_signature.user_inputs
    inputs = dict(kwargs)
    inputs.update({n: a for n, a in zip([n for n in names if n not in kwargs], args)})
    module = program.module()
    return _from_program(
        str(path), "pt2", program, _KwargsModule(module, names, len(args)), inputs, {}, digest, seconds
    )


class _KwargsModule:
    """Call an unlifted ExportedProgram module with keyword inputs."""

    def __init__(self, module, names, n_positional):
        self.module, self.names, self.n_positional = module, list(names), n_positional

    def __call__(self, **inputs):
        args = [inputs[n] for n in self.names[: self.n_positional]]
        kwargs = {n: inputs[n] for n in self.names[self.n_positional :] if n in inputs}
        return self.module(*args, **kwargs)


@dataclass
class PreparedSource:
    """A source loaded far enough to know its content hash, not yet exported."""

    spec: str
    kind: str
    digest: str
    module: Any = None
    inputs: dict[str, Any] = field(default_factory=dict)
    dynamic: dict[str, dict[int, Dim]] = field(default_factory=dict)
    trust_source: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    reads: list[list] = field(default_factory=list)
    """(path, size, mtime) of the files the source depends on (see adapter.core.reads)."""


def prepare_source(
    spec: str,
    dynamic: dict[str, dict[int, Dim]] | None = None,
    *,
    trust_source: bool = False,
) -> PreparedSource:
    """Check and load a source far enough to hash it (the cache key needs no export).

    Args:
        spec: The source string as given on the command line.
        dynamic: Named dynamic dims per input (from ``--dynamic``); overrides a
            factory's own.
        trust_source: Allow a ``.pt2`` that unpickles objects.

    Raises:
        SourceError: The source is missing, unsafe or malformed.
    """
    dynamic = dict(dynamic or {})
    kind = source_kind(spec)
    start = time.perf_counter()
    if kind == "onnx":
        files = source_files(Path(spec))
        return PreparedSource(spec, kind, onnx_digest(Path(spec)), dynamic=dynamic, reads=_reads.fingerprint(files))
    if kind == "pt2":
        _safety.check_pt2(Path(spec), trust_source)
        return PreparedSource(
            spec,
            kind,
            _sha256_files([Path(spec)]),
            dynamic=dynamic,
            trust_source=trust_source,
            reads=_reads.fingerprint([spec]),
        )
    if kind == "hf":
        folder = Path(spec)
        files = [p for p in folder.rglob("*") if p.is_file()]
        module, inputs, own_dynamic = _hf_model(folder)
        own_dynamic.update(dynamic)
        digest = _sha256_files(files, folder)
        digest = hashlib.sha256((digest + repr(sorted(own_dynamic.items()))).encode()).hexdigest()
        reads = _reads.fingerprint([str(p) for p in files])
    else:
        with _reads.recording() as opened:
            factory = load_factory(spec)
            try:
                with _safety.weights_only_loads():
                    result = factory()
            except Exception as exc:
                raise SourceError(
                    f"Factory '{spec}' raised {type(exc).__name__}: {exc}", "Run with --debug for the trace."
                ) from exc
        code = getattr(sys.modules.get(getattr(factory, "__module__", ""), None), "__file__", None)
        reads = _reads.fingerprint(opened | ({code} if code else set()))
        module, inputs, own_dynamic = _normalise_factory_result(spec, result)
        own_dynamic.update(dynamic)
        digest = _module_digest(spec, module, inputs, own_dynamic)
    prepared = PreparedSource(spec, kind, digest, module, inputs, own_dynamic, reads=reads)
    prepared.seconds["load"] = time.perf_counter() - start
    return prepared


def import_source(
    source: PreparedSource | str, dynamic: dict[str, dict[int, Dim]] | None = None, *, trust_source: bool = False
) -> ImportedModel:
    """Export a prepared source (or a source string) to ONNX with its reference.

    Raises:
        SourceError: The source is missing, unsafe or malformed.
        ExportError: torch.export or the ONNX exporter failed.
        UnsupportedOpsError: The model uses torch ops with no ONNX translation.
    """
    if isinstance(source, str):
        source = prepare_source(source, dynamic, trust_source=trust_source)
    seconds = dict(source.seconds)
    if source.kind == "onnx":
        return import_onnx(Path(source.spec), source.dynamic, source.digest)
    if source.kind == "pt2":
        return _import_pt2(Path(source.spec), source.trust_source, source.digest, seconds)
    return import_torch(source.spec, source.kind, source.module, source.inputs, source.dynamic, source.digest, seconds)
