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
on explicitly. Each stage is then split at its collective nodes into segments;
``adapter.runtime.shard`` compiles each with a backend and writes the sharded artifact, which
``adapter.runtime.worker`` runs under ``torchrun``.
"""

from __future__ import annotations

__all__ = [
    "DOMAIN",
    "ShardSpec",
    "tensor_parallel_module",
    "stage_bounds",
    "split_rank",
    "consumers_after",
    "segment_model",
]

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.core.errors import AdapterError
from adapter.op_library import node_cost

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


# --------------------------------------------------------------------------- stages and segments


def stage_bounds(model: ir.Model, pp: int, sizes: dict[str, int]) -> list[int]:
    """Node indices where stages 1..pp-1 start, balancing the op library's FLOPs (bytes when no FLOPs)."""
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


def consumers_after(model: ir.Model) -> dict[str, int]:
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
    last = consumers_after(model)
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


def segment_model(model: ir.Model, indices: list[int], needed_after: set[str]) -> ir.Model:
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
