"""Backend × op coverage over the test zoo (``adapter ops``).

Each zoo model is imported as ``convert`` does (export, ``canonicalize``), then copied
through each fusion pipeline. Every backend is measured on the graph its own module's
``PASSES`` produce (none: the canonical graph). ONNX Runtime and OpenVINO are asked live:
every node of that graph goes through their ``supports()``. TVM, TensorRT and MIGraphX are
judged by their op lists (:mod:`.documented`; TVM's is its installed converter map where
TVM imports): a node counts when its op is listed and every input the list requires to be
a build-time constant is one. Per op, the matrix shows the live answer over every zoo node
of that op, or for ops the zoo does not contain, the answer on a one-node probe graph.
"""

from __future__ import annotations

__all__ = ["ZOO_MODELS", "zoo_graphs", "probe_model", "live_support", "coverage", "render"]

import copy
import functools
from collections import Counter
from typing import Any

import onnx_ir as ir

from adapter.backends import BACKENDS, get_backend, graph_backends
from adapter.backends.documented import DOCUMENTED
from adapter.converter.importer import import_source
from adapter.op_library import OPS, OpEntry, _key
from adapter.passes import build_pipeline, run_pipeline

ZOO_MODELS = ("minilm", "gpt2", "llama", "vit", "resnet", "t5_encoder", "whisper_encoder")
PIPELINES = ("canonicalize", "fusion-ort", "fusion-standard")
OPSET = 20
"""The exporter's opset (probe graphs use it too)."""


@functools.cache
def _zoo_graph_cached(name: str, extra: tuple[str, ...] = ()) -> dict[str, ir.Model]:
    imported = import_source(f"adapter.zoo:{name}")
    run_pipeline(imported.model, build_pipeline("canonicalize"))
    graphs = {"canonicalize": imported.model}
    for pipeline in (*PIPELINES[1:], *extra):
        model = imported.model.clone()
        run_pipeline(model, build_pipeline(pipeline.split("+")))
        graphs[pipeline] = model
    return graphs


def zoo_graphs(models: tuple[str, ...] = ZOO_MODELS, extra: tuple[str, ...] = ()) -> dict[str, dict[str, ir.Model]]:
    """Per zoo model, the canonical graph and its copy through each fusion pipeline (cached per process).

    ``extra`` names further graphs to build: a pass list joined by ``+`` (a backend's ``PASSES``).
    """
    extra = tuple(sorted(set(extra) - set(PIPELINES)))
    return {name: _zoo_graph_cached(name, extra) for name in models}


def backend_passes(backend: str) -> tuple[str, ...]:
    """The backend's ``PASSES`` (read from the registry: no SDK needed)."""
    return tuple(BACKENDS[backend].PASSES)


def _pipeline_of(backend: str) -> str:
    """The graph a backend is measured on: ``canonicalize`` for no passes, else its passes joined by ``+``."""
    passes = backend_passes(backend)
    return "+".join(passes) if passes else "canonicalize"


def _constant(value: ir.Value | None) -> bool:
    if value is None or value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")


def documented_answer(backend: str, node: ir.Node) -> tuple[bool, str]:
    """A documented backend's answer for one node: (supported, why not)."""
    doc = DOCUMENTED[backend]
    if not doc.supports(node.op_type, node.domain):
        return False, "not listed" + (" (listed unsupported)" if node.op_type in doc.refused else "")
    for index in doc.constant_inputs.get(node.op_type, ()):
        if index < len(node.inputs) and not _constant(node.inputs[index]):
            return False, f"input {index} is computed at run time: {doc.notes.get(node.op_type, 'must be constant')}"
    return True, ""


# one-node probe graphs for ops the zoo does not contain: inputs (shape, dtype) and attributes
_F = ((1, 2, 4, 4), "FLOAT")
_PROBES: dict[str, tuple[list[tuple[tuple[int, ...], str]], dict[str, Any]]] = {
    "And": ([((2, 4), "BOOL")] * 2, {}),
    "Or": ([((2, 4), "BOOL")] * 2, {}),
    "Not": ([((2, 4), "BOOL")], {}),
    "TopK": ([_F, ((1,), "INT64")], {}),
    "CumSum": ([_F, ((), "INT64")], {}),
    "Tile": ([_F, ((4,), "INT64")], {}),
    "Reshape": ([_F, ((2,), "INT64")], {}),
    "ConstantOfShape": ([((2,), "INT64")], {}),
    "AveragePool": ([_F], {"kernel_shape": (2, 2)}),
    "MaxPool": ([_F], {"kernel_shape": (2, 2)}),
    "Gemm": ([((2, 4), "FLOAT"), ((4, 3), "FLOAT")], {}),
    "MatMul": ([((2, 4), "FLOAT"), ((4, 3), "FLOAT")], {}),
    "MatMulInteger": ([((2, 4), "UINT8"), ((4, 3), "UINT8")], {}),
    "QuantizeLinear": ([((2, 4), "FLOAT"), ((), "FLOAT"), ((), "UINT8")], {}),
    "DequantizeLinear": ([((2, 4), "UINT8"), ((), "FLOAT"), ((), "UINT8")], {}),
    "DynamicQuantizeLinear": ([((2, 4), "FLOAT")], {}),
    "SimplifiedLayerNormalization": ([((2, 4), "FLOAT"), ((4,), "FLOAT")], {"axis": -1}),
    "com.microsoft::MatMulNBits": (
        [((2, 32), "FLOAT"), ((8, 1, 16), "UINT8"), ((8,), "FLOAT")],
        {"K": 32, "N": 8, "bits": 4, "block_size": 32},
    ),
    "com.microsoft::QAttention": (
        [((1, 4, 8), "UINT8"), ((8, 24), "INT8"), ((24,), "FLOAT"), ((), "FLOAT"), ((), "FLOAT")],
        {"num_heads": 2},
    ),
}
_NUM_OUTPUTS = {"DynamicQuantizeLinear": 3, "TopK": 2}


def probe_model(entry: OpEntry) -> ir.Model:
    """A one-node model running ``entry``'s op on small float inputs (or the probe table's)."""
    import onnx

    if entry.key in _PROBES:
        specs, attrs = _PROBES[entry.key]
    else:
        arity = 1
        if not entry.domain:
            try:
                arity = max(1, onnx.defs.get_schema(entry.op_type, OPSET, "").min_input)
            except Exception:  # not an ONNX schema (ONNX Runtime's own standard-domain ops)
                arity = 1
        specs, attrs = [_F] * arity, {}
    inputs = [
        ir.Value(name=f"x{i}", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType[dtype]))
        for i, (shape, dtype) in enumerate(specs)
    ]
    node = ir.node(
        entry.op_type,
        inputs,
        attributes=attrs,
        domain=entry.domain,
        num_outputs=_NUM_OUTPUTS.get(entry.op_type, 1),
        name=f"probe_{entry.op_type}",
    )
    for i, out in enumerate(node.outputs):
        out.name = f"y{i}"
        out.type = inputs[0].type
    graph = ir.Graph(
        inputs, list(node.outputs), nodes=[node], opset_imports={"": OPSET, "com.microsoft": 1}, name="probe"
    )
    return ir.Model(graph, ir_version=10, producer_name="adapter.op_library")


def live_support(backend: str, entry: OpEntry) -> tuple[bool, str]:
    """Ask a live backend about ``entry`` on its probe graph: (supported, reason)."""
    model = probe_model(entry)
    node = next(iter(model.graph))
    answer = get_backend(backend).supports(node, model, None)
    return bool(answer), answer.reason


def _ask_graphs(backend: str, graphs: dict[str, dict[str, ir.Model]]) -> dict[tuple[str, str], list[tuple[str, bool]]]:
    """Every node of every zoo graph through the backend's supports(): (op key, answer) per graph."""
    module = get_backend(backend)
    answers: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for name, per_model in graphs.items():
        for pipeline, model in per_model.items():
            answers[(name, pipeline)] = [
                (_key(node.op_type, node.domain), bool(module.supports(node, model, None)))
                for node in model.graph.all_nodes()
            ]
    return answers


def _by_op(answers: dict[tuple[str, str], list[tuple[str, bool]]], pipelines=PIPELINES) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for (_, pipeline), pairs in answers.items():
        if pipeline in pipelines:
            for key, ok in pairs:
                out.setdefault(key, []).append(ok)
    return out


def _split(key: str) -> tuple[str, str]:
    """(op_type, domain) of an op key."""
    domain, _, op_type = key.rpartition("::")
    return op_type, domain


def _share(covered: int, total: int) -> dict[str, Any]:
    return {"covered": covered, "total": total, "share": round(covered / total, 4) if total else 1.0}


def coverage(models: tuple[str, ...] = ZOO_MODELS, backends: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The op × backend matrix and per-backend coverage shares over the zoo.

    ``backends`` defaults to every registered backend that builds engines from ONNX graphs
    (``adapter.backends.graph_backends``; llama.cpp runs its own graphs).
    Computed once per process and arguments (asking the live backends about every node of
    every zoo graph takes over a minute); each call gets its own copy.

    Returns:
        ``{"models", "backends": {name: {...shares, missing}}, "ops": [row, ...], "missing_entries": [...]}``.
    """
    return copy.deepcopy(_coverage(tuple(models), tuple(graph_backends() if backends is None else backends)))


@functools.cache
def _coverage(models: tuple[str, ...], backends: tuple[str, ...]) -> dict[str, Any]:
    pipelines = {b: _pipeline_of(b) for b in backends}
    graphs = zoo_graphs(models, tuple(pipelines.values()))
    instances: Counter = Counter()
    seen_in: dict[str, set[str]] = {}
    for name, per_model in graphs.items():
        most: Counter = Counter()  # per op, its count in the pipeline graph holding most of it
        for model in per_model.values():
            here = Counter(_key(n.op_type, n.domain) for n in model.graph.all_nodes())
            for key, count in here.items():
                seen_in.setdefault(key, set()).add(name)
                most[key] = max(most[key], count)
        instances.update(most)
    asked = {b: _ask_graphs(b, graphs) for b in backends if b not in DOCUMENTED}
    live = {b: _by_op(answers) for b, answers in asked.items()}

    rows: list[dict[str, Any]] = []
    for key, entry in sorted(OPS.items(), key=lambda kv: (kv[1].domain, kv[0])):
        support: dict[str, bool | None] = {}
        notes: dict[str, str] = {}
        for b in backends:
            if b in DOCUMENTED:
                doc = DOCUMENTED[b]
                support[b] = doc.supports(entry.op_type, entry.domain)
                if entry.op_type in doc.notes:
                    notes[b] = doc.notes[entry.op_type]
            elif key in live[b]:
                support[b] = all(live[b][key])
                if not support[b]:
                    notes[b] = f"refused {live[b][key].count(False)} of {len(live[b][key])} zoo nodes"
            else:
                support[b], reason = live_support(b, entry)
                notes[b] = "probe graph" + (f": {reason}" if reason else "")
        rows.append(
            {
                "op": key,
                "domain": entry.domain,
                "family": entry.family,
                "formula": entry.formula,
                "precisions": list(entry.precisions),
                "zoo_models": sorted(seen_in.get(key, ())),
                "zoo_instances": instances.get(key, 0),
                "support": support,
                "notes": notes,
                "spec": entry.spec,
            }
        )

    summary: dict[str, Any] = {}
    for b in backends:
        pipeline = pipelines[b]
        counts: Counter = Counter()
        per_op: dict[str, list[bool]] = {}
        conditional: Counter = Counter()
        for name in graphs:
            if b in DOCUMENTED:
                pairs = []
                for n in graphs[name][pipeline].graph.all_nodes():
                    ok, why = documented_answer(b, n)
                    pairs.append((_key(n.op_type, n.domain), ok))
                    if not ok and why.startswith("input"):
                        conditional[_key(n.op_type, n.domain)] += 1
            else:
                pairs = asked[b][(name, pipeline)]
            for key, ok in pairs:
                counts[key] += 1
                per_op.setdefault(key, []).append(ok)
        # an op counts as covered when the backend takes every one of its nodes in this graph
        ok_ops = [k for k in counts if all(per_op[k])]
        doc = DOCUMENTED.get(b)
        summary[b] = {
            "basis": doc.basis if doc else "live supports()",
            "source": doc.source if doc else f"adapter.backends.{b}.supports ({get_backend(b).version()})",
            "version": doc.version if doc else get_backend(b).version(),
            "pipeline": pipeline,
            "distinct_ops": _share(len(ok_ops), len(counts)),
            "node_instances": _share(sum(ok for oks in per_op.values() for ok in oks), sum(counts.values())),
            "missing": sorted(k for k in counts if k not in ok_ops),
            "missing_nodes": {k: per_op[k].count(False) for k in sorted(counts) if k not in ok_ops},
        }
        if doc:
            summary[b]["refused_by_condition"] = dict(sorted(conditional.items()))
    missing_entries = sorted(k for k in seen_in if k not in OPS)
    return {
        "models": list(models),
        "opset": OPSET,
        "backends": summary,
        "ops": rows,
        "entries": len(OPS),
        "missing_entries": missing_entries,
    }


def render(console: Any, data: dict[str, Any], backend: str | None = None) -> None:
    """Print the matrix (✓/✗ per backend, FLOPs formula) and the coverage shares."""
    from rich.markup import escape
    from rich.table import Table

    backends = [backend] if backend else list(data["backends"])
    table = Table(
        title=f"Op library: {data['entries']} ops × backends (zoo: {', '.join(data['models'])})", title_justify="left"
    )
    table.add_column("op")
    table.add_column("FLOPs")
    table.add_column("precisions")
    for b in backends:
        table.add_column(b, justify="center")
    table.add_column("zoo nodes", justify="right")
    marks = {True: "[green]✓[/]", False: "[red]✗[/]", None: "?"}
    for row in data["ops"]:
        cells = [marks[row["support"].get(b)] for b in backends]
        table.add_row(
            escape(row["op"]),
            escape(row["formula"]),
            ",".join(row["precisions"]),
            *cells,
            str(row["zoo_instances"] or "-"),
        )
    console.print(table)
    shares = Table(title="Coverage over the zoo", title_justify="left")
    for col in ("backend", "basis", "graph", "distinct ops", "node instances", "not covered"):
        shares.add_column(col)
    for b in backends:
        s = data["backends"][b]
        d, n = s["distinct_ops"], s["node_instances"]
        shares.add_row(
            b,
            s["basis"],
            s["pipeline"],
            f"{d['covered']}/{d['total']} ({d['share']:.1%})",
            f"{n['covered']}/{n['total']} ({n['share']:.1%})",
            escape(", ".join(s["missing"]) or "-"),
        )
    console.print(shares)
    for b in backends:
        s = data["backends"][b]
        if s["basis"] != "live supports()":
            console.print(f"[dim]{b}: {escape(s['version'])} — {escape(s['source'])}[/]")
    if data["missing_entries"]:
        console.print(
            f"[bold red]ops in the zoo with no library entry:[/] {escape(', '.join(data['missing_entries']))}"
        )
