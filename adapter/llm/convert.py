"""Convert a causal LM to a verified generation engine: export with the KV cache, build, verify.

Flow: load (HF folder or factory) -> :func:`~adapter.llm.export.export_decoder` ->
canonicalize -> per backend (those the target lists; ``auto`` builds each and keeps the
fastest decoder): ``DECODER.prepare`` once, then per rung of the INT4 ladder the weight
format (``fp32``; ``int8``/``int4`` weight-only; ``bf16`` where the CPU computes it) ->
build -> verify against eager PyTorch -> artifact.

Verification, always (:mod:`adapter.llm.verify`): FP32 engines against eager logits and
greedy tokens, reduced weights by next-token KL to FP32. The eager model's answers are
computed once (:class:`~adapter.llm.verify.EagerReference`); engines built from the eager
weights prepare first (llama.cpp: its FP32 GGUF), then the canonical graph's weights move
to a file in the staging folder and the eager model is let go, so no engine is built or
loaded beside it (TinyLlama INT4 raced over three backends: 7.05 GB peak, 1.6x its 4.4 GB
of FP32 weights, the peak being the export's).
"""

from __future__ import annotations

__all__ = ["LLMOptions", "bundle_tokenizer", "convert_causal_lm", "decoder_backends", "load_source"]

import dataclasses
import datetime as _dt
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends import BACKENDS, get_backend
from adapter.backends.base import threads_for
from adapter.converter.api import ConvertResult, default_output
from adapter.core import artifact
from adapter.core.errors import AdapterError, BackendUnavailableError, SourceError, VerificationError
from adapter.core.mapped import trim_heap
from adapter.core.onnx_io import release_weights, save_model
from adapter.llm.engine import KIND
from adapter.llm.export import export_decoder
from adapter.llm.families import CausalLM, factory_causal_lm, load_causal_lm
from adapter.llm.generate import generate
from adapter.llm.layout import DecoderLayout
from adapter.llm.verify import EagerReference, prompts, verify_decoder
from adapter.passes import build_pipeline, run_pipeline
from adapter.passes.weight_only import WeightOnlyQuantize
from adapter.profiles import load_profile

WEIGHTS = ("fp32", "bf16", "int8", "int4")


@dataclass(frozen=True)
class LLMOptions:
    """What shapes a generation engine."""

    target: str = "host"
    backend: str | None = None
    """``onnxruntime``, ``openvino`` or None/``auto`` (both built and raced on decode speed)."""
    weights: str = "fp32"
    """fp32, bf16 (where the CPU computes it), int8 or int4 (weight-only)."""
    group_size: int | None = None
    """INT4 block size (32/64/128); None: the backend's usual (ONNX Runtime 32, OpenVINO 128)."""
    symmetric: bool | None = None
    """INT4/INT8 without zero points; None: the backend's usual (ONNX Runtime yes, OpenVINO no)."""
    keep_fp32: tuple[str, ...] = ("lm_head",)
    """Layers (name substrings) left unquantized."""
    head_int8: bool = True
    """INT4 engines: the LM head at INT8 instead of FP32 (where ``keep_fp32`` names it). The
    head is the most sensitive layer and the largest single matrix (TinyLlama: 262 MB of
    FP32 read per token, as much as 11 INT4 blocks); INT8 keeps it within a small KL."""
    threads: int = 0
    verify_steps: int = 32
    kl_budget: float = 0.05
    """Largest mean next-token KL divergence to FP32 a reduced-weight engine may have."""
    max_abs: float = 1e-3
    """FP32 engines: largest logits difference to eager."""
    benchmark: bool = True


def load_source(source: str) -> CausalLM:
    """A causal LM from a Hugging Face folder or a factory.

    Raises:
        SourceError: Neither, or not a supported causal LM.
    """
    if Path(source).is_dir():
        return load_causal_lm(source)
    if ":" in source:
        found = factory_causal_lm(source)
        if found is not None:
            return found
    raise SourceError(
        f"'{source}' is not a causal language model adapter can export with a KV cache.",
        "Give a Hugging Face folder whose config names a ...ForCausalLM, or a factory returning one.",
    )


# --------------------------------------------------------------------------- build


def _settings(name: str, options: LLMOptions, profile) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "weights": options.weights, "threads": threads_for(options.threads, profile), "profile": options.target
    }  # fmt: skip
    if options.weights in ("int4", "int8"):
        usual = get_backend(name).DECODER.WEIGHT_DEFAULTS
        settings["block_size"] = options.group_size or usual["block_size"]
        settings["symmetric"] = usual["symmetric"] if options.symmetric is None else options.symmetric
    return settings


def _candidates(options: LLMOptions, profile) -> list[str]:
    explicit = options.backend not in (None, "auto")
    names = [options.backend] if explicit else decoder_backends(profile)
    usable = []
    for name in names:
        try:
            backend = get_backend(name)
        except BackendUnavailableError:
            if explicit:
                raise
            continue  # an optional engine (llama.cpp) not installed here: the race goes on without it
        if backend.DECODER is None:
            if explicit:
                raise AdapterError(
                    f"The {name} backend builds no generation engines yet.",
                    "Use "
                    + " or ".join(f"--backend {n}" for n, b in BACKENDS.items() if b.DECODER is not None)
                    + ".",
                )
            continue
        if options.weights not in backend.DECODER.WEIGHTS:
            if explicit:
                raise AdapterError(
                    f"The {name} backend builds no {options.weights} generation engines.",
                    f"It builds {', '.join(sorted(backend.DECODER.WEIGHTS))}.",
                )
            continue
        usable.append(name)
    if not usable:
        raise AdapterError(f"No backend builds {options.weights} generation engines for this target.")
    default = getattr(profile, "default_backend", None)
    if not explicit and getattr(profile, "kind", "cpu") == "gpu" and default in usable:
        # a GPU engine is verified through a CPU stand-in, whose decode speed says nothing
        # about the GPU: the target's own backend where it builds these weights, not a race
        return [default]
    return usable


def decoder_backends(profile) -> list[str]:
    """The backends ``--backend auto`` races for generation on ``profile``: those the target
    lists whose generation engines join auto on its kind (``DECODER.AUTO_KINDS``)."""
    kind = getattr(profile, "kind", "cpu")
    found = [
        n for n in getattr(profile, "backends", {})
        if n in BACKENDS and BACKENDS[n].DECODER is not None and kind in BACKENDS[n].DECODER.AUTO_KINDS
    ]  # fmt: skip
    return found


def _decode_speed(session, layout: DecoderLayout) -> dict[str, float]:
    prompt = prompts(layout, 1, min(32, layout.max_positions // 4), seed=11)[0]
    run = generate(session, layout, [prompt], min(16, layout.max_positions // 4), stop_at_eos=False)
    return {"ttft_ms": run.ttft_ms, "decode_tokens_per_s": run.decode_tokens_per_s, "prompt": len(prompt)}


def _widening(weights: str, layers: int) -> list[tuple[int, ...]]:
    """Decoder blocks kept INT8, in the order tried when INT4 misses the KL budget: none, the
    first two, two at each end, then a quarter of the stack at each end.

    The first blocks go first: in TinyLlama's shape (22 blocks, random weights) blocks 0-1
    at INT8 bring the INT4 KL from 0.123 to 0.039, the last two only to 0.123, the first and
    last two to 0.038 (llama.cpp Q4_0 with a Q8_0 head; ONNX Runtime's INT4 agrees within 1%),
    so the cheaper rung is tried before the one with twice the INT8 bytes.
    """
    if weights != "int4" or layers <= 1:
        return [()]
    half = layers // 2

    def ends(count: int) -> tuple[int, ...]:
        return tuple(sorted(set(range(count)) | set(range(layers - count, layers))))

    rungs = [(), tuple(range(min(2, half))), ends(min(2, half)), ends(min(half, max(2, layers // 4)))]
    return list(dict.fromkeys(rungs))  # in order, each once


def _block_patterns(blocks: tuple[int, ...]) -> tuple[str, ...]:
    """Module-path pieces of the given decoder blocks (HF's ``layers.i`` / ``h.i``)."""
    return tuple(p for i in blocks for p in (f"layers.{i}.", f".h.{i}."))


def _backend_passes(graph: ir.Model, decoder) -> tuple[ir.Model, list]:
    """The backend's own passes on a copy that shares the canonical weights (the graph itself
    when it has none)."""
    if not decoder.PASSES:
        return graph, []
    model = graph.clone()
    return model, [r.to_json() for r in run_pipeline(model, build_pipeline(list(decoder.PASSES)))]


def _weight_quantized(
    model: ir.Model, decoder, options: LLMOptions, settings: dict[str, Any], blocks: tuple[int, ...]
) -> tuple[ir.Model, list]:
    """ONNX Runtime's weight-only quantization of a copy: the widened ``blocks`` (and an INT4
    engine's LM head) INT8 first, the rest at ``weights``; ``model`` itself when the backend
    quantizes."""
    if options.weights not in decoder.QUANTIZE_IN_GRAPH:
        return model, []
    model, records = model.clone(), []
    form = getattr(decoder, "WEIGHT_FORM", "nbits")
    head = ("lm_head",) if options.weights == "int4" and options.head_int8 else ()
    keep = tuple(k for k in options.keep_fp32 if k not in head)
    wider = _block_patterns(blocks) + head
    if form == "qdq":  # INT4 DequantizeLinear only (ONNX Runtime's tool writes no INT8 QDQ): wider is FP32
        if not settings["symmetric"]:
            raise AdapterError(
                "This backend's INT4 weights are symmetric: its DequantizeLinear takes no INT4 zero points "
                "(TensorRT's weight-only INT4).", "Convert without --asymmetric, or choose another backend.",
            )  # fmt: skip
        keep, wider = keep + wider, ()
    steps = [(8, wider)] if wider else []
    steps.append((4 if options.weights == "int4" else 8, ()))
    for bits, only in steps:
        quantize = WeightOnlyQuantize(
            bits=bits, block_size=settings["block_size"], symmetric=settings["symmetric"], keep=keep, only=only,
            form=form,
        )  # fmt: skip
        quantize(model)
        records.append(quantize.record.to_json())
    return model, records


def backend_graph(
    graph: ir.Model, decoder, options: LLMOptions, settings: dict[str, Any], blocks: tuple[int, ...] = ()
) -> tuple[ir.Model, list]:
    """The backend's graph: its passes, then ONNX Runtime's weight-only quantization, on
    copies that share the canonical weights."""
    model, records = _backend_passes(graph, decoder)
    model, quantized = _weight_quantized(model, decoder, options, settings, blocks)
    return model, records + quantized


def _file_backed(graph: ir.Model, folder: Path) -> ir.Model:
    """``graph`` with its weights in a file in ``folder``, read through mappings; the tensors
    it held in memory (the eager model's own parameters, after the export) are let go."""
    folder.mkdir(parents=True, exist_ok=True)
    for value in graph.graph.initializers.values():
        tensor = value.const_value
        array = tensor.numpy() if tensor is not None else None
        if array is not None and not array.flags.c_contiguous:
            # a folded transpose is a strided view of the eager weight: written element by
            # element it takes 10x as long (TinyLlama: 24 s), made whole all at once it takes
            # a second copy of the weights; one at a time it takes neither
            value.const_value = ir.LazyTensor(
                lambda a=array: ir.tensor(np.ascontiguousarray(a)), dtype=tensor.dtype, shape=tensor.shape,
                name=tensor.name,
            )  # fmt: skip
    save_model(graph, folder / "canonical.onnx", external=True)
    return ir.load(folder / "canonical.onnx")


def _build_one(
    name, graph: ir.Model | None, prepared: Any, reference: EagerReference, layout, options, profile, workdir: Path,
    scratch: Path, say,
) -> dict[str, Any]:  # fmt: skip
    """Build, load and verify one backend's decoder (from ``prepared`` for an engine built from
    the eager weights, else from ``graph``); INT4 that misses the KL budget is retried with
    more blocks in INT8 (:func:`_widening`: the first ones, then both ends of the stack)."""
    backend = get_backend(name)
    backend.require()
    decoder = backend.DECODER
    if decoder.PASSES:
        say(f"passes ({name})")
    if decoder.SOURCE == "weights":  # the engine brings its own graph: prepared from the eager weights
        passed, pass_records = prepared, []
    else:
        passed, pass_records = _backend_passes(graph, decoder)  # once: every rung quantizes this graph
        passed = decoder.prepare(passed, layout, scratch)
        release_weights(graph)
    attempts: list[dict[str, Any]] = []
    ladder = _widening(options.weights, layout.num_layers)
    for blocks in ladder:
        settings = _settings(name, options, profile)
        if options.weights in decoder.QUANTIZE_IN_GRAPH:
            say(f"quantize {options.weights} ({name}{f', blocks {list(blocks)} INT8' if blocks else ''})")
        if decoder.SOURCE == "weights":  # it quantizes itself, the LM head as the options say
            settings["head_int8"] = options.head_int8
        model, records = _weight_quantized(passed, decoder, options, settings, blocks)
        records = pass_records + records
        settings["int8_blocks"] = list(blocks)
        say(f"build {name}")
        config = decoder.build(model, layout, workdir, settings)
        del model
        trim_heap()  # the quantized copy's weights, before the engine loads
        if graph is not None:
            release_weights(graph)  # the pages of the canonical weights' file the build read
        session = decoder.load(workdir, config, layout)
        say(f"verify {name}")
        try:
            verification = verify_decoder(session, reference, layout, options.weights, options)
        except VerificationError as exc:
            if blocks == ladder[-1] or options.weights == "fp32":
                raise
            attempts.append({"int8_blocks": list(blocks), "error": str(exc)})
            session = None  # the next rung's build must not sit beside this engine's weights
            continue
        verification["attempts"] = attempts
        speed = _decode_speed(session, layout) if options.benchmark else None
        return {"name": name, "version": backend.version(), "config": config, "verification": verification,
                "speed": speed, "passes": records}  # fmt: skip
    raise AssertionError("unreachable: the last rung raises")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def bundle_tokenizer(source: Path | None, tokenizer: Any, folder: Path) -> bool:
    """The source folder's tokenizer files as they are (regular files inside the folder; no
    transformers round trip, which may rebuild a tokenizer from the config's family), else
    the loaded ``tokenizer`` saved by transformers. Whether anything was written."""
    if source is not None and (Path(source) / "tokenizer.json").is_file():
        source = Path(source)
        folder.mkdir(parents=True, exist_ok=True)
        for name in _TOKENIZER_FILES:
            path = source / name
            if path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(source.resolve()):
                shutil.copyfile(path, folder / name)
        return True
    if tokenizer is None:
        return False
    tokenizer.save_pretrained(str(folder))
    return True


def convert_causal_lm(
    source: str | CausalLM,
    output: Path | str | None = None,
    options: LLMOptions = LLMOptions(),
    progress: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Convert a causal LM to a verified generation engine artifact (see the module docstring).

    Raises:
        AdapterError: Any user-facing failure (unsupported family, export, verification).
    """
    say = progress or (lambda _stage: None)
    started = time.perf_counter()
    if options.weights not in WEIGHTS:
        raise AdapterError(f"Unknown weight format '{options.weights}'.", f"Use one of {', '.join(WEIGHTS)}.")
    profile = load_profile(options.target)
    names = _candidates(options, profile)
    if options.weights == "bf16" and "bf16" not in profile.precisions:
        raise AdapterError(
            f"Target '{profile.name}' has no native BF16 arithmetic (AVX512_BF16, AMX), so a BF16 engine would run emulated.",
            "Use --weights fp32, int8 or int4 here.",
        )
    say("load source")
    lm = source if isinstance(source, CausalLM) else load_source(source)
    spec = lm.source
    output = Path(output) if output else default_output(spec, options.target)
    say("export")
    graph, layout, seconds = export_decoder(lm.model, lm.family)
    say("passes")
    records = run_pipeline(graph, build_pipeline(["canonicalize"]))
    say("eager reference")
    reference = EagerReference.of(lm.model, layout, options.weights, options.verify_steps)
    with artifact.staging_dir(output) as staged:
        ir.external_data.load_to_model(graph)
        built, errors, prepared = [], {}, {}
        decoders = {name: get_backend(name).DECODER for name in names}

        def attempt(name: str, work: Callable[[], Any]) -> Any:
            """``work()``, or None with its error kept for the race (a lone candidate's is raised)."""
            try:
                return work()
            except AdapterError as exc:
                if len(names) == 1:
                    raise
                errors[name] = str(exc)
                return None

        def prepare_from_eager(name: str) -> Any:
            get_backend(name).require()
            return decoders[name].prepare(lm, layout, staged / ".prepared" / name)

        for name in names:  # the eager weights' last users: engines that bring their own graph
            if decoders[name].SOURCE == "weights":
                say(f"prepare {name}")
                prepared[name] = attempt(name, lambda n=name: prepare_from_eager(n))
        if any(d.SOURCE == "graph" for d in decoders.values()):
            say("weights to file")  # the graph engines read them mapped from there
            graph = _file_backed(graph, staged / ".canonical")
        else:
            graph = None
        lm = dataclasses.replace(lm, model=None)  # the caller's own object keeps its model
        trim_heap()
        for name in (n for n in names if n not in errors):
            workdir = staged if len(names) == 1 else staged / ".candidates" / name
            result = attempt(
                name,
                lambda n=name, g=graph, w=workdir: _build_one(
                    n, g, prepared.get(n), reference, layout, options, profile, w, staged / ".prepared" / n, say
                ),
            )
            if result is not None:
                built.append((result, workdir))
            trim_heap()  # the candidate's graphs and engine, before the next one's build
        del graph
        trim_heap()  # the canonical graph's mappings close before its file goes
        for scratch in (".canonical", ".prepared"):
            shutil.rmtree(staged / scratch, ignore_errors=True)
            if (staged / scratch).exists():
                raise AdapterError(f"Could not remove the scratch folder {staged / scratch} before publishing.")
        if not built:
            raise AdapterError(
                "No backend built a verified generation engine: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
            )
        best, workdir = max(built, key=lambda b: (b[0]["speed"] or {}).get("decode_tokens_per_s", 0.0))
        if workdir != staged:
            for item in workdir.iterdir():
                item.rename(staged / item.name)
            shutil.rmtree(staged / ".candidates", ignore_errors=True)
        if lm.tokenizer is not None:
            bundle_tokenizer(Path(lm.source) if lm.kind == "huggingface-folder" else None, lm.tokenizer,
                             staged / "tokenizer")  # fmt: skip
        manifest = {
            "adapter_version": artifact.library_versions()["adapter"],
            "kind": KIND,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "source": {"spec": spec, "kind": lm.kind, "family": lm.family},
            "options": asdict(options),
            "target": {"name": profile.name, "digest": profile.digest()},
            "layout": layout.to_json(),
            "backend": {
                "name": best["name"],
                "version": best["version"],
                "config": best["config"],
                "candidates": [
                    {"name": b["name"], "chosen": b is best, "config": b["config"], "speed": b["speed"],
                     "verification": b["verification"]}  # fmt: skip
                    for b, _ in built
                ]
                + [{"name": n, "chosen": False, "error": e} for n, e in errors.items()],
            },
            "passes": [r.to_json() for r in records] + best["passes"],
            "weights": options.weights,
            "verification": best["verification"],
            "latency": best["speed"],
            "timings_s": {**seconds, "total": time.perf_counter() - started},
            "tokenizer": "tokenizer" if lm.tokenizer is not None else None,
            "libraries": artifact.library_versions(),
        }
        artifact.write_manifest(staged, manifest)
        artifact.publish(staged, output)
    manifest = artifact.read_manifest(output)
    return ConvertResult(output, manifest, False, time.perf_counter() - started)
