"""Tensor- and pipeline-parallel passes: one ONNX graph per rank, cut into segments at collective points.

Tensor parallelism (Megatron-style) is applied to the PyTorch modules before export, so the
exporter does the shape bookkeeping: per tensor-parallel rank, attention's Q/K/V projections
and the first MLP projection keep a slice of their output features (whole heads), the
attention output and second MLP projections keep the matching slice of their input features
and are followed by one all-reduce, the word embedding keeps a slice of the vocabulary (ids
outside it give zeros, then an all-reduce) and a language-model head keeps a slice of the
vocabulary's logits (then an all-gather). The collectives are exported as nodes of the
``adapter.dist`` domain (``torch.onnx.ops.symbolic``): ``AllReduce`` and ``AllGather``.

Pipeline parallelism cuts each rank graph, in topological order, into stages of balanced
cost (the op library's FLOPs at the example shapes); every value a later stage needs is sent
on explicitly. Each stage is then split at its collective nodes into segments, each compiled
by a backend into an engine. ``adapter.distributed`` runs the result under ``torchrun``.
"""

from __future__ import annotations

__all__ = [
    "DOMAIN",
    "ShardSpec",
    "tensor_parallel_module",
    "rank_graphs",
    "stage_bounds",
    "split_rank",
    "build_sharded",
]

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.errors import AdapterError

DOMAIN = "adapter.dist"
"""Domain of the collective nodes the tensor-parallel export writes."""
COLLECTIVES = {"AllReduce": "all_reduce", "AllGather": "all_gather"}
SHARDED_ATOL = 1e-5
"""Largest difference allowed between the sharded run and the unsharded engine (FP32)."""
UNSHARDED = "unsharded"
"""Folder of the whole model's engine inside a sharded artifact (what the ranks must reproduce)."""


# --------------------------------------------------------------------------- tensor parallel (torch)


def _collective(op: str, x, tp: int):
    import torch

    shape = x.shape if op == "AllReduce" else (*x.shape[:-1], x.shape[-1] * tp)
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{op}", (x,), {"axis": -1}, dtype=x.dtype, shape=shape, version=1)


def _shard_rows(weight, parts: list[tuple[int, int]]):
    import torch

    return torch.cat([weight[a:b] for a, b in parts], dim=0).clone()


class _ColumnLinear:
    """Factory: an ``nn.Linear`` keeping the output features in ``parts`` (ranges)."""

    @staticmethod
    def make(linear, parts: list[tuple[int, int]]):
        from torch import nn

        out = sum(b - a for a, b in parts)
        new = nn.Linear(linear.in_features, out, bias=linear.bias is not None)
        new.weight.data = _shard_rows(linear.weight.data, parts)
        if linear.bias is not None:
            new.bias.data = _shard_rows(linear.bias.data, parts)
        return new


def _row_linear(linear, start: int, stop: int, tp: int):
    """An ``nn.Linear`` keeping input features ``start:stop``; all-reduce, then the (whole) bias."""
    import torch.nn.functional as F
    from torch import nn

    class RowParallelLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(linear.weight.data[:, start:stop].clone(), requires_grad=False)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)

        def forward(self, x):
            y = _collective("AllReduce", F.linear(x, self.weight), tp)
            return y if self.bias is None else y + self.bias

    return RowParallelLinear()


def _row_conv1d(conv, start: int, stop: int, tp: int):
    """GPT-2's ``Conv1D`` (weight [in, out]) keeping input features ``start:stop``, then all-reduce + bias."""
    import torch
    from torch import nn

    class RowParallelConv1D(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(conv.weight.data[start:stop].clone(), requires_grad=False)
            self.bias = nn.Parameter(conv.bias.data.clone(), requires_grad=False)

        def forward(self, x):
            return _collective("AllReduce", torch.matmul(x, self.weight), tp) + self.bias

    return RowParallelConv1D()


def _column_conv1d(conv, parts: list[tuple[int, int]]):
    """GPT-2's ``Conv1D`` keeping output features in ``parts``."""
    import torch

    new = copy.deepcopy(conv)
    new.weight = torch.nn.Parameter(torch.cat([conv.weight.data[:, a:b] for a, b in parts], 1).clone(), False)
    new.bias = torch.nn.Parameter(torch.cat([conv.bias.data[a:b] for a, b in parts]).clone(), False)
    new.nf = new.weight.shape[1]
    return new


def _vocab_embedding(embedding, start: int, stop: int, tp: int):
    """An ``nn.Embedding`` holding rows ``start:stop``: ids outside give zeros, then all-reduce."""
    import torch.nn.functional as F
    from torch import nn

    class VocabParallelEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(embedding.weight.data[start:stop].clone(), requires_grad=False)
            self.padding_idx = embedding.padding_idx

        def forward(self, ids):
            inside = (ids >= start) & (ids < stop)
            local = (ids - start) * inside
            rows = F.embedding(local, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
            return _collective("AllReduce", rows, tp)

    return VocabParallelEmbedding()


def _vocab_head(linear, start: int, stop: int, tp: int):
    """A language-model head keeping the logits of vocabulary ``start:stop``, then all-gather."""
    import torch.nn.functional as F
    from torch import nn

    class VocabParallelHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(linear.weight.data[start:stop].clone(), requires_grad=False)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data[start:stop].clone(), False)

        def forward(self, x):
            return _collective("AllGather", F.linear(x, self.weight, self.bias), tp)

    return VocabParallelHead()


def _span(size: int, tp: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """Rank's contiguous share of ``size`` features, in whole ``unit`` blocks (heads)."""
    if size % (tp * unit):
        raise AdapterError(f"{size} features in blocks of {unit} cannot be split {tp} ways.")
    share = size // tp
    return rank * share, (rank + 1) * share


def _set(root, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def tensor_parallel_module(module, tp: int, rank: int):
    """A copy of ``module`` holding tensor-parallel rank ``rank``'s share of the weights.

    Handles BERT-style encoders (``query``/``key``/``value``, ``attention.output.dense``,
    ``intermediate.dense``, ``output.dense``, ``word_embeddings``) and GPT-2 (``c_attn``,
    ``c_proj``, ``c_fc``, ``wte``, ``lm_head``).

    Raises:
        AdapterError: The model has no layer these rules split, or a size does not divide by ``tp``.
    """
    from torch import nn

    model = copy.deepcopy(module)
    if tp == 1:
        return model
    changed = 0
    vocab_rows: dict[int, tuple[int, int]] = {}
    for path, sub in list(model.named_modules()):
        kind = type(sub).__name__
        if hasattr(sub, "query") and hasattr(sub, "key") and hasattr(sub, "value"):  # BERT self-attention
            heads = sub.num_attention_heads
            unit = sub.attention_head_size
            if heads % tp:
                raise AdapterError(f"{path}: {heads} attention heads cannot be split {tp} ways.")
            part = [_span(sub.query.out_features, tp, rank, unit)]
            for name in ("query", "key", "value"):
                setattr(sub, name, _ColumnLinear.make(getattr(sub, name), part))
            sub.num_attention_heads = heads // tp
            sub.all_head_size = sub.num_attention_heads * unit
            changed += 3
        elif kind == "GPT2Attention":
            heads, width = sub.num_heads, sub.embed_dim
            if heads % tp:
                raise AdapterError(f"{path}: {heads} attention heads cannot be split {tp} ways.")
            a, b = _span(width, tp, rank, sub.head_dim)
            sub.c_attn = _column_conv1d(sub.c_attn, [(a + k * width, b + k * width) for k in range(3)])
            sub.c_proj = _row_conv1d(sub.c_proj, a, b, tp)
            sub.split_size = b - a
            sub.num_heads, sub.embed_dim = heads // tp, b - a
            changed += 2
        elif kind == "GPT2MLP":
            a, b = _span(sub.c_fc.nf, tp, rank)
            sub.c_fc = _column_conv1d(sub.c_fc, [(a, b)])
            sub.c_proj = _row_conv1d(sub.c_proj, a, b, tp)
            changed += 2
        elif isinstance(sub, nn.Linear) and path.endswith(("attention.output.dense", ".output.dense")):
            a, b = _span(sub.in_features, tp, rank)
            _set(model, path, _row_linear(sub, a, b, tp))
            changed += 1
        elif isinstance(sub, nn.Linear) and path.endswith("intermediate.dense"):
            _set(model, path, _ColumnLinear.make(sub, [_span(sub.out_features, tp, rank)]))
            changed += 1
        elif isinstance(sub, nn.Embedding) and path.endswith(("word_embeddings", "wte")):
            a, b = _span(sub.num_embeddings, tp, rank)
            vocab_rows[id(sub.weight)] = (a, b)
            _set(model, path, _vocab_embedding(sub, a, b, tp))
            changed += 1
    for path, sub in list(model.named_modules()):
        if isinstance(sub, nn.Linear) and path.endswith("lm_head"):
            a, b = _span(sub.out_features, tp, rank)
            _set(model, path, _vocab_head(sub, a, b, tp))
            changed += 1
    if not changed:
        raise AdapterError(
            f"No layer of {type(module).__name__} matches the tensor-parallel rules (BERT-style encoders, GPT-2).",
            "Use pipeline parallelism only (--tp 1), or add a rule for this architecture in passes/sharding.py.",
        )
    return model


# --------------------------------------------------------------------------- graphs per rank


def rank_graphs(prepared, tp: int, say=lambda _m: None) -> list[Any]:
    """Export each tensor-parallel rank's module (collectives as ``adapter.dist`` nodes), canonicalized.

    ``prepared`` is an ``adapter.importer.PreparedSource`` of a PyTorch source.
    """
    from adapter.passes import build_pipeline, run_pipeline

    from adapter.importer import _import_torch

    if prepared.module is None:
        raise AdapterError(
            "Tensor parallelism needs a PyTorch source (a factory or a Hugging Face folder).",
            "Give the factory instead of an ONNX/.pt2 file, or use --tp 1.",
        )
    graphs = []
    for rank in range(tp):
        say(f"export tensor-parallel rank {rank}")
        module = tensor_parallel_module(prepared.module, tp, rank).eval()
        imported = _import_torch(
            prepared.spec, prepared.kind, module, prepared.inputs, prepared.dynamic, prepared.digest, {}
        )
        run_pipeline(imported.model, build_pipeline(["canonicalize"]))
        graphs.append(imported)
    kinds = [[(n.domain, n.op_type) for n in g.model.graph] for g in graphs]  # node names may differ
    if any(k != kinds[0] for k in kinds[1:]):
        raise AdapterError("The tensor-parallel ranks exported different graphs; they cannot run in lock-step.")
    return graphs


def _sizes(specs, examples: dict[str, np.ndarray]) -> dict[str, int]:
    from adapter.specs import Dim

    sizes = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, Dim) and spec.name in examples:
                sizes[dim.name] = int(examples[spec.name].shape[axis])
    return sizes


def stage_bounds(model: ir.Model, pp: int, sizes: dict[str, int]) -> list[int]:
    """Node indices where stages 1..pp-1 start, balancing the op library's FLOPs (bytes when no FLOPs)."""
    from adapter.op_library import node_cost

    nodes = list(model.graph)
    if pp > max(1, len(nodes)):
        raise AdapterError(f"{pp} pipeline stages for a graph of {len(nodes)} nodes.")
    costs = []
    for node in nodes:
        try:
            cost = node_cost(node, sizes)
            costs.append(float(cost.flops or 0) + 1e-3 * float(cost.bytes or 0))
        except KeyError:
            costs.append(0.0)
    cumulative = np.cumsum(costs)
    total = cumulative[-1] if len(cumulative) else 0.0
    bounds = []
    for stage in range(1, pp):
        index = int(np.searchsorted(cumulative, total * stage / pp)) + 1
        index = min(max(index, (bounds[-1] + 1) if bounds else 1), len(nodes) - (pp - stage))
        bounds.append(index)
    return bounds


@dataclass
class ShardSpec:
    """One rank's part: its stage's nodes split into steps, and what crosses the stage boundary."""

    rank: int
    stage: int
    tp_rank: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    recv: list[str] = field(default_factory=list)
    send: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _consumers_after(model: ir.Model) -> dict[str, int]:
    """For each value name: the index of the last node that reads it (graph outputs: infinity)."""
    last: dict[str, int] = {}
    for index, node in enumerate(model.graph):
        for value in node.inputs:
            if value is not None:
                last[value.name] = index
    for value in model.graph.outputs:
        last[value.name] = 1 << 60
    return last


def split_rank(model: ir.Model, bounds: list[int]) -> list[tuple[list[tuple[str, list[int]]], list[str], list[str]]]:
    """Per stage: its steps as (kind, node indices), the values it receives and the values it sends on.

    kind is ``segment`` (run by an engine) or a collective op name; values received by stage s
    are every graph input or earlier-produced value read at stage s or later.
    """
    nodes = list(model.graph)
    starts = [0, *bounds]
    ends = [*bounds, len(nodes)]
    produced_at: dict[str, int] = {}
    for value in model.graph.inputs:
        produced_at[value.name] = -1
    for index, node in enumerate(nodes):
        for value in node.outputs:
            produced_at[value.name] = index
    last = _consumers_after(model)
    initializers = set(model.graph.initializers)
    stages = []
    for start, end in zip(starts, ends):
        steps: list[tuple[str, list[int]]] = []
        current: list[int] = []
        for index in range(start, end):
            node = nodes[index]
            if node.domain == DOMAIN:
                if current:
                    steps.append(("segment", current))
                    current = []
                steps.append((node.op_type, [index]))
            else:
                current.append(index)
        if current:
            steps.append(("segment", current))
        live_in = sorted(
            name
            for name, at in produced_at.items()
            if at < start and name not in initializers and last.get(name, -1) >= start
        )
        live_out = sorted(
            name
            for name, at in produced_at.items()
            if at < end and name not in initializers and last.get(name, -1) >= end
        )
        stages.append((steps, live_in if start > 0 else [], live_out if end < len(nodes) else []))
    return stages


def _segment_model(model: ir.Model, indices: list[int], needed_after: set[str]) -> ir.Model:
    """The nodes at ``indices`` as a model of their own: inputs are what they read from outside."""
    import onnx
    import onnx.utils

    nodes = list(model.graph)
    chosen = [nodes[i] for i in indices]
    produced = {v.name for n in chosen for v in n.outputs}
    inputs: list[str] = []
    for node in chosen:
        for value in node.inputs:
            if value is None or value.name in produced or value.is_initializer() or value.name in inputs:
                continue
            inputs.append(value.name)
    outputs = [v.name for n in chosen for v in n.outputs if v.name in needed_after]
    proto = ir.serde.serialize_model(model)
    extracted = onnx.utils.Extractor(proto).extract_model(inputs, outputs)
    segment = ir.serde.deserialize_model(extracted)
    segment.opset_imports.pop(DOMAIN, None)  # collectives run between segments, never inside one
    return segment


def _spec(value: ir.Value, dims: dict[str, Any]):
    from adapter.specs import Dim, TensorSpec

    shape = []
    for d in value.shape or []:
        if isinstance(d, int):
            shape.append(d)
        else:
            name = str(d.value) if getattr(d, "value", None) is not None else "?"
            shape.append(dims.get(name, Dim(name)))
    dtype = value.dtype.numpy().name if value.dtype is not None else "float32"
    return TensorSpec(value.name, dtype, tuple(shape))


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
    """Write a sharded artifact for ``tp`` x ``pp`` ranks (manifest format: ``adapter.distributed``).

    With ``verify``, the staged artifact is first run under ``torchrun`` on the example
    inputs and its outputs compared with the unsharded engine's (max-abs ≤ 1e-5).

    Raises:
        AdapterError: The source cannot be sharded this way, or a segment does not compile.
        VerificationError: The sharded run's outputs differ from the unsharded engine's.
    """
    from adapter.backends import get_backend
    from adapter.passes import build_pipeline, run_pipeline
    from adapter.profiles import load_profile

    from adapter import artifact
    from adapter.importer import import_source, prepare_source
    from adapter.specs import Dim

    if tp < 1 or pp < 1 or microbatches < 1:
        raise AdapterError(f"tp, pp and microbatches must be at least 1 (got {tp}, {pp}, {microbatches}).")
    started = time.perf_counter()
    profile = load_profile(target)
    module = get_backend(backend)
    prepared = prepare_source(source)
    say("export the unsharded model")
    whole = import_source(prepared)
    run_pipeline(whole.model, build_pipeline(["canonicalize"]))
    graphs = rank_graphs(prepared, tp, say) if tp > 1 else [whole]
    dims = {d.name: d for s in whole.inputs for d in s.shape if isinstance(d, Dim)}
    sizes = _sizes(whole.inputs, whole.example_inputs)
    bounds = stage_bounds(graphs[0].model, pp, sizes)
    world = tp * pp
    output = Path(output)
    ranks: list[dict[str, Any]] = []
    weights: dict[int, int] = {}
    with artifact.staging_dir(output) as staged:
        for t, imported in enumerate(graphs):
            model = imported.model
            stages = split_rank(model, bounds)
            last = _consumers_after(model)
            values = {v.name: v for n in model.graph for v in n.outputs}
            values.update({v.name: v for v in model.graph.inputs})
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
                    "outputs": [v.name for v in model.graph.outputs] if s == pp - 1 else [],
                }
                weights[rank] = 0
                nodes = list(model.graph)
                for k, (kind, indices) in enumerate(steps):
                    if kind != "segment":
                        node = nodes[indices[0]]
                        spec["steps"].append(
                            {
                                "op": COLLECTIVES[kind],
                                "input": node.inputs[0].name,
                                "output": node.outputs[0].name,
                                "axis": -1,
                            }  # fmt: skip
                        )
                        continue
                    after = {name for name, at in last.items() if at > indices[-1]}
                    segment = _segment_model(model, indices, after)
                    folder = f"rank{rank}/seg{k}"
                    say(f"rank {rank}: compile segment {k} ({len(indices)} nodes)")
                    ins = [_spec(v, dims) for v in segment.graph.inputs]
                    outs = [_spec(v, dims) for v in segment.graph.outputs]
                    options = module.Options.from_profile(profile, {})
                    engine = module.compile(segment, profile, options, (ins, outs), staged / folder)
                    weights[rank] += sum(
                        v.const_value.nbytes for v in segment.graph.initializers.values() if v.const_value is not None
                    )
                    spec["steps"].append(
                        {
                            "op": "run",
                            "engine": {
                                "folder": folder,
                                "backend": backend,
                                "config": engine.config,
                                "inputs": [i.to_json() for i in ins],
                                "outputs": [o.to_json() for o in outs],
                            },
                        }
                    )
                ranks.append(spec)
        ranks.sort(key=lambda r: r["rank"])
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
    from adapter.cli_launch import run_sharded
    from adapter.errors import VerificationError

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
