"""Run one engine inside the emulated ARM64 machine (copied there; stdlib, numpy and the runtime only).

Usage: ``python3 runner.py WORKDIR``. WORKDIR holds ``job.json`` (kind, model, input and
output names), ``inputs.npz`` (arrays ``i0``, ``i1``, ... in call order) and the engine's
files. Kind ``ort-generate`` runs a decoder greedily instead: ``i0`` is the prompt's token
ids, ``job["generate"]`` names the cache inputs/outputs and gives its shape and the number
of new tokens; the output is those tokens. Writes ``machine.json`` (what machine this ran on) first, then ``out.npz`` (arrays
``o0``, ``o1``, ...) with ``outputs.json`` naming them. This file must not import adapter.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _flatten(value) -> list[np.ndarray]:
    """Arrays from a runtime result: a tensor, or a (nested) tuple/array of them."""
    if hasattr(value, "numpy"):
        return [np.asarray(value.numpy())]
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        found = []
        for item in value:
            found.extend(_flatten(item))
        return found
    return [np.asarray(value)]


def _run_ort(model: Path, names: list[str], args: list[np.ndarray], outputs: list[str]) -> tuple[list, list[str]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    wanted = outputs or [o.name for o in session.get_outputs()]
    return session.run(wanted, dict(zip(names, args))), wanted


def _generate_ort(model: Path, job: dict, prompt: np.ndarray) -> tuple[list, list[str]]:
    """Greedy decoding, one sequence, the cache concatenated by the graph (past -> present)."""
    import onnxruntime as ort

    spec = job["generate"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    heads, head_dim = spec["cache"]
    past = {name: np.zeros((1, heads, 0, head_dim), np.float32) for name in spec["past"]}
    ids = prompt.astype(np.int64)[None]
    tokens: list[int] = []
    for _ in range(int(spec["steps"])):
        length = len(prompt) + len(tokens)
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, length), np.int64),
            "position_ids": np.arange(length - ids.shape[1], length, dtype=np.int64)[None],
            **past,
        }
        logits, *present = session.run(["logits", *spec["present"]], feed)
        tokens.append(int(logits[0, -1].argmax()))
        past = dict(zip(spec["past"], present))
        ids = np.array([[tokens[-1]]], np.int64)
    return [np.array(tokens, np.int64)], ["tokens"]


def _run_tvm(model: Path, args: list[np.ndarray], outputs: list[str]) -> tuple[list, list[str]]:
    import tvm
    from tvm import relax

    device = tvm.cpu()
    lib = tvm.runtime.load_module(str(model))
    vm = relax.VirtualMachine(lib, device)
    result = vm["main"](*[tvm.runtime.tensor(a, device) for a in args])
    arrays = _flatten(result)
    return arrays, outputs or [f"output_{k}" for k in range(len(arrays))]


def main(work: Path) -> int:
    started = time.monotonic()
    job = json.loads((work / "job.json").read_text())
    machine = {"machine": platform.machine(), "uname": os.uname().machine, "python": platform.python_version(),
               "numpy": np.__version__}
    _write_json(work / "machine.json", machine)
    with np.load(work / "inputs.npz", allow_pickle=False) as data:
        args = [data[f"i{k}"] for k in range(len(job["inputs"]))]
    model = work / job["model"]
    if job["kind"] == "ort":
        import onnxruntime

        machine["onnxruntime"] = onnxruntime.__version__
        arrays, names = _run_ort(model, job["inputs"], args, job["outputs"])
    elif job["kind"] == "ort-generate":
        import onnxruntime

        machine["onnxruntime"] = onnxruntime.__version__
        arrays, names = _generate_ort(model, job, args[0])
    elif job["kind"] == "tvm":
        import tvm

        machine["apache-tvm"] = tvm.__version__
        arrays, names = _run_tvm(model, args, job["outputs"])
    else:
        print(f"unknown kind {job['kind']!r}", file=sys.stderr)
        return 2
    if len(arrays) != len(names):
        print(f"the model returned {len(arrays)} outputs, expected {len(names)} ({names})", file=sys.stderr)
        return 3
    tmp = work / "out.tmp.npz"
    np.savez(tmp, **{f"o{k}": np.asarray(a) for k, a in enumerate(arrays)})
    _write_json(work / "outputs.json", names)
    os.replace(tmp, work / "out.npz")
    machine["seconds"] = round(time.monotonic() - started, 2)
    _write_json(work / "machine.json", machine)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
