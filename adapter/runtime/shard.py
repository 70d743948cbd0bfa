"""The sharding driver: export each tensor-parallel rank, cut stages and segments
(:mod:`adapter.passes.sharding`), compile every segment with a backend and write the
sharded artifact; optionally run it under ``torchrun`` and compare with the unsharded engine.
"""

from __future__ import annotations

__all__ = ["build_sharded", "rank_graphs"]

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from adapter.backends import get_backend
from adapter.converter.importer import import_source, prepare_source
from adapter.core import artifact
from adapter.core.errors import AdapterError, VerificationError
from adapter.core.specs import Dim, example_sizes, spec_of
from adapter.passes import build_pipeline, run_pipeline
from adapter.passes.sharding import (
    COLLECTIVES,
    SHARDED_ATOL,
    UNSHARDED,
    consumers_after,
    segment_model,
    split_rank,
    stage_bounds,
)
from adapter.passes.tensor_parallel import analyse
from adapter.passes.tensor_parallel_ranks import tensor_parallel_graph
from adapter.profiles import load_profile
from adapter.runtime.launch import run_sharded


def rank_graphs(whole, tp: int, say=lambda _m: None) -> tuple[list[Any], dict[str, Any]]:
    """Each tensor-parallel rank's graph (collectives as ``adapter.dist`` nodes) and the pass's report.

    ``whole`` is the canonicalized unsharded ``ImportedModel``; the pairs are found in its graph
    (:mod:`adapter.passes.tensor_parallel`), so any source — a factory, a Hugging Face folder or
    an ONNX file — splits the same way.
    """
    say(f"find the tensor-parallel pairs in the graph ({tp} ranks)")
    plan = analyse(whole.model, tp)
    graphs = []
    for rank in range(tp):
        say(f"write tensor-parallel rank {rank}")
        graphs.append(dataclasses.replace(whole, model=tensor_parallel_graph(whole.model, plan, rank)))
    return graphs, plan.report()


def rank_specs(
    models: list[Any], bounds: list[int], compile_segment, cache: frozenset[str] | set[str] | None = None
) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The manifest's rank table for tensor-parallel rank graphs ``models`` cut at ``bounds``.

    Rank ``stage * tp + t`` runs stage ``stage`` of ``models[t]``: its steps are the segments
    between collectives (``compile_segment(segment, folder)`` compiles one and returns its
    engine entry) and the collectives themselves. With ``cache`` (generation: the names of the
    present keys and values) every stage is given the graph inputs it reads and lists the
    cache outputs it makes under ``cache`` (it keeps them); the last stage's other outputs are
    its ``outputs``.
    Returns the ranks (sorted) and the weight bytes per rank.
    """
    tp, pp = len(models), len(bounds) + 1
    ranks: list[dict[str, Any]] = []
    weights: dict[int, int] = {}
    for t, model in enumerate(models):
        stages = split_rank(model, bounds, cache is not None)
        last = consumers_after(model)
        nodes = list(model.graph)
        graph_outputs = [v.name for v in model.graph.outputs]
        for s, (steps, recv, send) in enumerate(stages):
            rank = s * tp + t
            spec: dict[str, Any] = {
                "rank": rank,
                "stage": s,
                "tp_rank": t,
                "tp_group": [s * tp + i for i in range(tp)],
                "recv_from": rank - tp if s > 0 else None,
                "recv": recv,
                "send_to": rank + tp if s < pp - 1 else None,
                "send": send,
                "steps": [],
                "outputs": graph_outputs if s == pp - 1 else [],
            }
            weights[rank] = 0
            made: set[str] = set()
            for k, (kind, indices) in enumerate(steps):
                made |= {v.name for i in indices for v in nodes[i].outputs}
                if kind != "segment":
                    node = nodes[indices[0]]
                    axis = node.attributes["axis"].value if "axis" in node.attributes else -1
                    spec["steps"].append({"op": COLLECTIVES[kind], "input": node.inputs[0].name,
                                          "output": node.outputs[0].name, "axis": int(axis)})  # fmt: skip
                    continue
                after = {name for name, at in last.items() if at > indices[-1]}
                segment = segment_model(model, indices, after)
                spec["steps"].append({"op": "run", "engine": compile_segment(segment, f"rank{rank}/seg{k}")})
                weights[rank] += sum(
                    v.const_value.nbytes for v in segment.graph.initializers.values() if v.const_value is not None
                )
            if cache is not None:
                spec["cache"] = [name for name in graph_outputs if name in made and name in cache]
                spec["outputs"] = [name for name in spec["outputs"] if name not in cache]
            ranks.append(spec)
    ranks.sort(key=lambda r: r["rank"])
    return ranks, weights


def build_sharded(
    source: str,
    output: Path,
    tp: int = 1,
    pp: int = 1,
    microbatches: int = 1,
    backend: str = "onnxruntime",
    target: str = "host",
    say=lambda _m: None,
    verify: bool = False,
    timeout: float = 60.0,
    plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a sharded artifact for ``tp`` x ``pp`` ranks (manifest format: ``adapter.runtime.worker``).

    With ``verify``, the staged artifact is first run under ``torchrun`` on the example
    inputs and its outputs compared with the unsharded engine's (max-abs ≤ 1e-5).

    Raises:
        AdapterError: The source cannot be sharded this way, or a segment does not compile.
        VerificationError: The sharded run's outputs differ from the unsharded engine's.
    """

    if tp < 1 or pp < 1 or microbatches < 1:
        raise AdapterError(f"tp, pp and microbatches must be at least 1 (got {tp}, {pp}, {microbatches}).")
    started = time.perf_counter()
    profile = load_profile(target)
    module = get_backend(backend)
    prepared = prepare_source(source)
    say("export the unsharded model")
    whole = import_source(prepared)
    run_pipeline(whole.model, build_pipeline(["canonicalize"]))
    graphs, tp_report = rank_graphs(whole, tp, say) if tp > 1 else ([whole], None)
    dims = {d.name: d for s in whole.inputs for d in s.shape if isinstance(d, Dim)}
    sizes = example_sizes(whole.inputs, whole.example_inputs)
    bounds = stage_bounds(graphs[0].model, pp, sizes)
    world = tp * pp
    output = Path(output)
    with artifact.staging_dir(output) as staged:

        def compile_segment(segment, folder: str) -> dict[str, Any]:
            say(f"compile {folder} ({len(segment.graph)} nodes)")
            ins = [spec_of(v, dims) for v in segment.graph.inputs]
            outs = [spec_of(v, dims) for v in segment.graph.outputs]
            options = module.Options.from_profile(profile, {})
            engine = module.compile(segment, profile, options, (ins, outs), staged / folder)
            return {"folder": folder, "backend": backend, "config": engine.config,
                    "inputs": [i.to_json() for i in ins], "outputs": [o.to_json() for o in outs]}  # fmt: skip

        ranks, weights = rank_specs([g.model for g in graphs], bounds, compile_segment)
        whole_bytes = sum(
            v.const_value.nbytes for v in whole.model.graph.initializers.values() if v.const_value is not None
        )
        batch_axis = {s.name: 0 for s in whole.inputs if s.shape and isinstance(s.shape[0], Dim)}
        manifest = {
            "kind": "sharded",
            "world_size": world,
            "tp": tp,
            "pp": pp,
            "microbatches": microbatches,
            "backend": backend,
            "source": {"spec": source, "digest": whole.digest},
            "target": profile.name,
            "inputs": [s.to_json() for s in whole.inputs],
            "outputs": [s.to_json() for s in whole.outputs],
            "batch_axis": batch_axis,
            "ranks": ranks,
            "stage_bounds": bounds,
            "weights_bytes": {"unsharded": whole_bytes, "per_rank": {str(r): b for r, b in sorted(weights.items())}},
            "seconds": round(time.perf_counter() - started, 2),
        }
        np.savez(staged / "example_inputs.npz", **whole.example_inputs)
        say("compile the unsharded engine (the reference the ranks are compared with)")
        reference = module.compile(
            whole.model, profile, module.Options.from_profile(profile, {}), (whole.inputs, whole.outputs),
            staged / UNSHARDED,
        )  # fmt: skip
        manifest["unsharded"] = {"folder": UNSHARDED, "backend": backend, "config": reference.config}
        if plan is not None:
            manifest["plan"] = plan
        if tp_report is not None:
            manifest["tensor_parallel"] = tp_report
        artifact.write_manifest(staged, manifest)
        if verify:
            say(f"verify: run the {world} ranks under torchrun and compare with the unsharded engine")
            manifest["verification"] = _verify_sharded(staged, world, reference, whole.example_inputs, timeout)
            manifest["seconds"] = round(time.perf_counter() - started, 2)
            artifact.write_manifest(staged, manifest)
        artifact.publish(staged, output)
    return manifest


def _verify_sharded(folder: Path, world: int, reference, feed: dict[str, np.ndarray], timeout: float) -> dict[str, Any]:
    """Run the artifact's ranks on ``feed`` and compare with the unsharded engine (FP32: max-abs ≤ 1e-5)."""

    result = run_sharded(folder, world, inputs=folder / "example_inputs.npz", timeout=timeout)
    expected = reference.run(feed)
    figures: dict[str, dict[str, float]] = {}
    for name, want in expected.items():
        got = np.asarray(result["outputs"][name], dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        cosine = float(np.dot(got.ravel(), want.ravel()) / (np.linalg.norm(got) * np.linalg.norm(want) or 1.0))
        figures[name] = {"max_abs": float(np.abs(got - want).max()), "cosine": cosine}
    passed = all(f["max_abs"] <= SHARDED_ATOL for f in figures.values())
    report = {
        "against": "the unsharded engine on the example inputs",
        "atol": SHARDED_ATOL,
        "outputs": figures,
        "passed": passed,
        "ranks": result["ranks"],
        "launch_seconds": result["seconds"],
    }
    if not passed:
        worst = ", ".join(f"{n}: max-abs {f['max_abs']:.3g}" for n, f in figures.items())
        raise VerificationError(f"The sharded run differs from the unsharded engine ({worst}; allowed {SHARDED_ATOL}).")
    return report
