"""TensorRT generation engines: the decoder's TensorRT-ready ONNX and its build recipe.

``build`` writes ``decoder.onnx`` (standard domain only, opset at most the parser's, the
cache concatenated in the graph: ``past_key_values.<i>.*`` in, ``present.<i>.*`` out) with
``profiles.json``, ``build.py``, ``build.sh`` and ``README.md`` from the encoder recipe's
generator. The KV inputs get two optimization profiles over one context window:

* profile 0, any step (the decode loop's shapes are its opt): new tokens 1..context,
  past 0..context-1, the mask's total length 1..context;
* profile 1, prefill: the prompt 1..context with an empty past.

trtexec takes one profile, so ``build.sh`` builds profile 0, which covers both phases;
``build.py`` builds both. Weight-only INT4 (``--weights int4``) puts each projection's weights
through a blocked ``DequantizeLinear`` (INT4, symmetric, blocks of 128 along K, FP32 scales;
opset 21) before its MatMul, written by ONNX Runtime's quantizer in its QDQ form: the form
TensorRT takes for weight-only INT4 (explicit quantization, built as a strongly typed
network; NVIDIA's ModelOpt writes the same). The LM head and any widened blocks stay FP32
(asymmetric INT4 is refused by the driver before quantizing). TensorRT's runtime cannot be
installed on this machine, so no plan is built here and the session is ONNX Runtime's CPU
provider over the same ``decoder.onnx`` (:class:`~adapter.backends._ort_decoder.OrtDecoder`, cache ``concat``):
verification checks the graph TensorRT would build, not the GPU's numerics.
"""

from __future__ import annotations

__all__ = ["PASSES", "SOURCE", "AUTO_KINDS", "WEIGHTS", "QUANTIZE_IN_GRAPH", "WEIGHT_DEFAULTS", "decoder_profiles", "prepare", "build", "load"]

from pathlib import Path
from typing import Any

import onnx_ir as ir

from adapter.backends import _tensorrt_scripts as scripts
from adapter.backends._kernels import attach_kernels
from adapter.backends._ort_decoder import OrtDecoder
from adapter.backends._recipe import MAX_OPSET, check_onnx, prepare_graph, standard_domain_problems
from adapter.backends.base import graph_as_is
from adapter.core.errors import UnsupportedOpsError
from adapter.core.onnx_io import save_model
from adapter.kernels.plan import decoder_problems
from adapter.profiles import load_profile

MODEL_FILE = "decoder.onnx"
PASSES: tuple[str, ...] = ()
"""None: TensorRT fuses itself, and its parser reads the standard domain only."""
SOURCE = "graph"
AUTO_KINDS = frozenset({"cpu", "gpu"})
"""Joins the generation race wherever the target lists the backend."""
WEIGHTS = frozenset({"fp32", "int4"})
"""FP32 graphs, and weight-only INT4 through blocked ``DequantizeLinear`` (see the module)."""
QUANTIZE_IN_GRAPH = frozenset({"int4"})
WEIGHT_FORM = "qdq"
"""The driver's weight-only pass writes ``DequantizeLinear`` + ``MatMul``, not ``MatMulNBits``."""
WEIGHT_DEFAULTS = {"block_size": 128, "symmetric": True}
"""TensorRT's INT4 weights are symmetric: its dequantize takes no INT4 zero points."""
MAX_BATCH = 8
"""The profiles' largest batch."""
OPT_PROMPT = 128
OPT_PAST = 256


def _input(dtype: str, dims: list[str | int], low: list[int], opt: list[int], high: list[int]) -> dict[str, Any]:
    names = [d if isinstance(d, str) else None for d in dims]
    return {"dtype": dtype, "dynamic": any(names), "dims": names, "min": low, "opt": opt, "max": high}


def decoder_profiles(layout: Any, max_batch: int = MAX_BATCH, context: int | None = None) -> dict[str, Any]:
    """``profiles.json`` for a decoder: per profile and input, min/opt/max shapes (see the module)."""
    context = int(context or layout.max_positions)
    heads, head = layout.kv_heads, layout.head_dim
    prompt = min(OPT_PROMPT, context)
    past = min(OPT_PAST, context - 1)

    def step(seq: tuple[int, int, int], cache: tuple[int, int, int]) -> dict[str, Any]:
        """One profile from the (min, opt, max) new positions and cached positions."""
        total = (max(1, seq[0] + cache[0]), seq[1] + cache[1], min(context, seq[2] + cache[2]))
        tokens = _input("int64", ["batch", "sequence"], [1, seq[0]], [1, seq[1]], [max_batch, seq[2]])
        entry = {
            "input_ids": tokens,
            "attention_mask": _input("int64", ["batch", "total"], [1, total[0]], [1, total[1]], [max_batch, total[2]]),
            "position_ids": dict(tokens),
        }
        for name in layout.past_names():
            entry[name] = _input(
                "float32", ["batch", heads, "past", head],
                [1, heads, cache[0], head], [1, heads, cache[1], head], [max_batch, heads, cache[2], head],
            )  # fmt: skip
        return {"inputs": entry}

    return {
        "profiles": [step((1, 1, context), (0, past, context - 1)), step((1, prompt, context), (0, 0, 0))],
        "dims": {"batch": {"min": 1, "opt": 1, "max": max_batch}, "context": context},
    }


prepare = graph_as_is


def build(model: ir.Model, layout: Any, workdir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Write the TensorRT-ready decoder and its recipe (see the module); returns the config.

    Raises:
        UnsupportedOpsError: Nodes outside the standard domain (TensorRT's parser reads no other).
    """
    int4 = settings.get("weights") == "int4"
    graph = prepare_graph(model, max(MAX_OPSET, 21) if int4 else MAX_OPSET)
    refused = standard_domain_problems(graph, "TensorRT's ONNX parser reads the standard domain only")
    if refused:
        raise UnsupportedOpsError("tensorrt", refused, "Build this decoder with another backend (--backend).")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = save_model(graph, workdir / MODEL_FILE)
    check_onnx(workdir / MODEL_FILE)
    profiles = decoder_profiles(layout)
    recipe = scripts.BuildSettings(MODEL_FILE, (), False, 3, 0, False, profiles, strongly_typed=int4)
    # the Triton kernels of its prefill and decode steps, compiled for the target's GPU
    found = decoder_problems(graph, layout, context=profiles["dims"]["context"])
    kernels = attach_kernels(graph, load_profile(settings["profile"]), {}, settings.get("weights", "fp32"), workdir,
                             found) if settings.get("profile") else {}  # fmt: skip
    note = (
        "No TensorRT engine was built: TensorRT's runtime is not installed here. Build it on the target "
        f"with: python {scripts.BUILD_FILE} (both profiles) or the trtexec line in {scripts.SHELL_FILE} (profile 0)."
    )
    return {
        "model_file": MODEL_FILE,
        "files": [*files, *scripts.write_recipe(workdir, recipe, note),
                  *(f for k in kernels.get("triton_kernels", []) for f in k["files"])],
        **kernels,
        "kv_cache": "concat",
        "engine_built": False,
        "trtexec": scripts.trtexec_args(recipe),
        "note": note,
        **settings,
    }


def load(folder: Path, config: dict[str, Any], layout: Any) -> OrtDecoder:
    """ONNX Runtime's CPU provider over ``decoder.onnx``: the stand-in for the GPU engine."""
    return OrtDecoder(folder, config, layout)
