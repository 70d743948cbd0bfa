"""Sharded generation: a causal LM's KV-cache decoder over tensor- and pipeline-parallel ranks.

``build_sharded_llm`` exports the decoder once (:mod:`adapter.llm.export`), finds its
tensor-parallel pairs in the graph (:mod:`adapter.passes.tensor_parallel`: the present keys
and values stay per rank, so each rank caches only its KV heads, or all of them where the KV
heads do not divide by the degree), cuts each rank graph into pipeline stages (every stage
is given the step's ids, mask and positions and keeps the cache of its own layers; only the
hidden state crosses stages) and into engines at the collectives, and writes a ``sharded``
artifact with a ``generation`` section. :mod:`adapter.llm.rank_generate` runs it under
``torchrun``: every rank runs the same generation loop, the last stage's logits are
broadcast at every step, so every rank picks the same token and rank 0 streams them.

Before publishing (when the model fits a quarter of this process's memory), the artifact
generates greedily under ``torchrun`` and its tokens are compared with the unsharded engine's
(the whole graph compiled by the same backend, run here by :class:`GraphSession`), with the
first step's logits alongside; the unsharded engine is in turn checked against eager PyTorch
(:func:`adapter.llm.verify.verify_decoder`: prefill and decode logits, 32 greedy tokens).
"""

from __future__ import annotations

__all__ = [
    "GraphSession",
    "WORKER",
    "build_sharded_llm",
    "generate_sharded",
    "generation_request",
    "unsharded_engine",
]

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adapter.backends import get_backend
from adapter.core import artifact
from adapter.core.errors import AdapterError, VerificationError
from adapter.core.mapped import memory_budget, peak_rss_bytes
from adapter.core.specs import Dim, TensorSpec, spec_of
from adapter.llm.convert import LLMOptions, bundle_tokenizer, load_source
from adapter.llm.export import DIM_LIMITS, export_decoder
from adapter.llm.generate import Sampling, generate, left_pad
from adapter.llm.layout import DecoderLayout
from adapter.llm.rank_generate import TOKEN_MARK
from adapter.llm.streamed import export_streamed
from adapter.llm.verify import verify_decoder
from adapter.passes import build_pipeline, run_pipeline
from adapter.passes.sharding import UNSHARDED, stage_bounds, weight_costs
from adapter.passes.tensor_parallel import analyse
from adapter.passes.tensor_parallel_ranks import tensor_parallel_graph
from adapter.profiles import load_profile
from adapter.runtime.launch import run_sharded
from adapter.runtime.shard import rank_specs

TASK = "text-generation"
WORKER = "adapter.llm.rank_generate"
"""The module torchrun runs on every rank of a sharded generation."""
PLAN_SIZES = {"batch": 1, "seq": 1, "past": 512, "total": 513}
"""Sizes of one decode step over a 512-token past (the stage cuts balance the weight bytes a
decode step reads, which is what bounds its time)."""


def _dims() -> dict[str, Dim]:
    dims = {name: Dim(name, lo, hi) for name, (lo, hi) in DIM_LIMITS.items()}
    dims["total"] = Dim("total", 1, DIM_LIMITS["past"][1] + DIM_LIMITS["seq"][1])
    return dims


class GraphSession:
    """A decoder session over one engine of the whole graph: the cache is its presents, fed back.

    The unsharded reference of a sharded artifact (and of its ranks' first steps).
    """

    def __init__(self, engine, layout: DecoderLayout) -> None:
        self.engine = engine
        self.layout = layout
        self.cache: dict[str, np.ndarray] = {}

    def start(self, batch: int, capacity: int) -> None:
        empty = np.zeros(self.layout.cache_shape(batch, 0), np.float32)
        self.cache = {name: empty for name in self.layout.past_names()}

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, last_only: bool = False) -> np.ndarray:
        out = self.engine.run({"input_ids": ids, "attention_mask": mask, "position_ids": positions, **self.cache})
        for past, present in zip(self.layout.past_names(), self.layout.present_names()):
            self.cache[past] = out[present]
        return out["logits"][:, -1:, :] if last_only else out["logits"]


def unsharded_engine(folder: Path, manifest: dict[str, Any]):
    """The sharded artifact's whole-graph engine (what its ranks must reproduce)."""
    entry = manifest["unsharded"]
    module = get_backend(entry["backend"])
    return module.Engine(
        Path(folder) / entry["folder"],
        [TensorSpec.from_json(s) for s in manifest["inputs"]],
        [TensorSpec.from_json(s) for s in manifest["outputs"]],
        entry["config"],
    )


def _verify_prompts(layout: DecoderLayout) -> list[list[int]]:
    """Two prompts of different lengths (a left-padded batch), ids drawn away from the special tokens."""
    rng = np.random.default_rng(7)
    return [rng.integers(3, layout.vocab_size, size=n).tolist() for n in (5, 9)]


def generation_request(
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_at_eos: bool = True,
    stream: bool = False,
    first_logits: bool = False,
) -> dict[str, Any]:
    """What every rank of a sharded generation reads (``--request``): prompts, length, sampling."""
    return {
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "sampling": {
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
        },  # fmt: skip
        "stop_at_eos": stop_at_eos,
        "stream": stream,
        "first_logits": first_logits,
    }


def generate_sharded(
    folder: Path,
    nproc: int,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_at_eos: bool = True,
    timeout: float = 60.0,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    env: dict[str, str] | None = None,
    first_logits: bool = False,
) -> dict[str, Any]:
    """Generate with a sharded decoder artifact under torchrun; rank 0's answer and the rank reports.

    Raises:
        AdapterError: A rank failed (the message names it), or the artifact does not generate.
    """
    import json

    request = generation_request(prompts, max_new_tokens, sampling, stop_at_eos, on_tokens is not None, first_logits)

    def line(text: str) -> None:
        at = text.find(TOKEN_MARK)
        if at >= 0 and on_tokens is not None:
            data = json.loads(text[at + len(TOKEN_MARK) :])
            on_tokens(data["step"], data["tokens"])

    result = run_sharded(folder, nproc, timeout=timeout, env=env, request=request, worker=WORKER, on_line=line)
    return {"generation": result["result"], "ranks": result["ranks"], "seconds": result["seconds"],
            "network": result["network"]}  # fmt: skip


def build_sharded_llm(
    source: str,
    output: Path,
    tp: int = 1,
    pp: int = 1,
    backend: str = "onnxruntime",
    target: str = "host",
    say: Callable[[str], None] = lambda _m: None,
    verify: bool | None = None,
    timeout: float = 60.0,
    verify_steps: int = 32,
    plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a sharded generation artifact for ``tp`` x ``pp`` ranks (see the module docstring).

    A Hugging Face folder is streamed (:mod:`adapter.llm.streamed`): the graph is exported
    without weights and each rank's engine files are written tensor by tensor from the
    checkpoint, so the model may be larger than this process's memory. ``verify`` (default:
    when the whole model takes at most a quarter of this process's memory) builds the unsharded
    engine and compares 32 greedy tokens under torchrun.

    Raises:
        AdapterError: The source is no causal LM, the graph does not split, a segment does not compile.
        VerificationError: The sharded greedy tokens differ from the unsharded engine's.
    """
    if tp < 1 or pp < 1:
        raise AdapterError(f"tp and pp must be at least 1 (got {tp}, {pp}).")
    started = time.perf_counter()
    profile = load_profile(target)
    module = get_backend(backend)
    tokenizer = None
    if Path(source).is_dir():
        say("export the decoder with its KV cache, without its weights (read from the checkpoint when written)")
        graph, layout, seconds, _ = export_streamed(source)
    else:
        say("load source")
        lm = load_source(source)
        say("export the decoder with its KV cache")
        graph, layout, seconds = export_decoder(lm.model, lm.family)
        tokenizer, lm = lm.tokenizer, None
    run_pipeline(graph, build_pipeline(["canonicalize"]))
    whole = sum(v.const_value.nbytes for v in graph.graph.initializers.values() if v.const_value is not None)
    budget = memory_budget()
    if verify is None:
        verify = whole <= budget / 4
    tp_plan = None
    models = [graph]
    if tp > 1:
        say(f"find the tensor-parallel pairs in the graph ({tp} ranks)")
        tp_plan = analyse(graph, tp, set(layout.present_names()))
        models = [tensor_parallel_graph(graph, tp_plan, r) for r in range(tp)]
    bounds = stage_bounds(models[0], pp, PLAN_SIZES, weight_costs(models[0]))
    dims = _dims()
    output = Path(output)
    # the ranks map their weight files: ONNX Runtime keeps no second (prepacked) copy
    options = module.Options.from_profile(profile, {"mapped": True} if backend == "onnxruntime" else {})
    with artifact.staging_dir(output) as staged:

        def compile_segment(segment, folder: str) -> dict[str, Any]:
            say(f"compile {folder} ({len(segment.graph)} nodes)")
            ins = [spec_of(v, dims) for v in segment.graph.inputs]
            outs = [spec_of(v, dims) for v in segment.graph.outputs]
            engine = module.compile(segment, profile, options, (ins, outs), staged / folder)
            return {"folder": folder, "backend": backend, "config": engine.config,
                    "inputs": [i.to_json() for i in ins], "outputs": [o.to_json() for o in outs]}  # fmt: skip

        ranks, weights = rank_specs(models, bounds, compile_segment, set(layout.present_names()))
        folder = Path(source) if Path(source).is_dir() else None
        bundled = bundle_tokenizer(folder, tokenizer, staged / "tokenizer")  # text for `adapter serve`
        inputs = [spec_of(v, dims) for v in graph.graph.inputs]
        outputs = [spec_of(v, dims) for v in graph.graph.outputs]
        reference = None
        if verify:
            say("compile the unsharded engine (the reference the ranks are compared with)")
            reference = module.compile(graph, profile, options, (inputs, outputs), staged / UNSHARDED)
        del graph
        manifest: dict[str, Any] = {
            "kind": "sharded",
            "task": TASK,
            "world_size": tp * pp,
            "tp": tp,
            "pp": pp,
            "microbatches": 1,
            "backend": backend,
            "source": {"spec": source},
            "target": profile.name,
            "layout": layout.to_json(),
            "tokenizer": "tokenizer" if bundled else None,
            "inputs": [s.to_json() for s in inputs],
            "outputs": [s.to_json() for s in outputs],
            "ranks": ranks,
            "stage_bounds": bounds,
            "weights_bytes": {"unsharded": whole, "per_rank": {str(r): b for r, b in sorted(weights.items())}},
            "timings_s": seconds,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if reference is not None:
            manifest["unsharded"] = {"folder": UNSHARDED, "backend": backend, "config": reference.config}
        if tp_plan is not None:
            manifest["tensor_parallel"] = tp_plan.report()
        if plan is not None:
            manifest["plan"] = plan
        artifact.write_manifest(staged, manifest)
        if verify:
            say(f"verify: generate {verify_steps} greedy tokens on {tp * pp} ranks under torchrun")
            manifest["verification"] = _verify(staged, manifest, reference, layout, verify_steps, timeout)
            say("verify the unsharded engine against eager PyTorch (logits and greedy tokens)")
            eager = load_source(source).model
            manifest["verification"]["eager"] = verify_decoder(
                GraphSession(reference, layout), eager, layout, "fp32", LLMOptions(verify_steps=verify_steps)
            )
            del eager
        else:
            manifest["verification"] = {"passed": None, "skipped": (
                f"the whole model ({whole / 2**30:.2f} GiB) is more than a quarter of this process's memory "
                f"({budget / 2**30:.2f} GiB): no unsharded reference was built") if whole > budget / 4 else
                "not asked for (--no-verify)"}  # fmt: skip
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        artifact.write_manifest(staged, manifest)
        artifact.publish(staged, output)
    return manifest


def _verify(folder: Path, manifest: dict[str, Any], reference, layout: DecoderLayout, steps: int,
            timeout: float) -> dict[str, Any]:  # fmt: skip
    prompts = _verify_prompts(layout)
    want = generate(GraphSession(reference, layout), layout, prompts, steps, stop_at_eos=False)
    ran = generate_sharded(folder, manifest["world_size"], prompts, steps, stop_at_eos=False, timeout=timeout,
                           first_logits=True)  # fmt: skip
    got = ran["generation"]
    session = GraphSession(reference, layout)
    ids, mask, positions = left_pad(prompts, layout.pad_token_id or 0)
    session.start(len(prompts), ids.shape[1] + 1)
    first = session.step(ids, mask, positions)[:, -1, :]
    logits = np.asarray(got["first_logits"], np.float32)
    report = {
        "against": "the unsharded engine (same backend), greedy",
        "prompts": prompts,
        "steps": steps,
        "tokens_equal": got["tokens"] == want.tokens,
        "first_logits_max_abs": float(np.abs(logits - first).max()),
        "ranks": ran["ranks"],
        "launch_seconds": ran["seconds"],
        "decode_tokens_per_s": got["decode_tokens_per_s"],
        "time_to_first_token_ms": got["time_to_first_token_ms"],
    }
    report["passed"] = report["tokens_equal"]
    if not report["passed"]:
        raise VerificationError(
            f"The sharded generation's greedy tokens differ from the unsharded engine's over {steps} steps "
            f"(first-step logits max-abs {report['first_logits_max_abs']:.3g})."
        )
    return report
