"""The sharded runtime under torchrun (gloo, CPU): TP, PP with microbatches, TP x PP, all_gather, faults.

The artifacts are built by hand from small ONNX graphs (``onnx.helper``), so these tests check
the runtime and the launcher on their own, without the sharding passes. Every run starts real
processes (``python -m torch.distributed.run``); faults use the ``ADAPTER_FAULT`` test hook.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from adapter.core.errors import AdapterError, ArtifactError
from adapter.runtime.launch import run_sharded, torchrun_command
from adapter.runtime.sharded import parse_fault, split_microbatches

psutil = pytest.importorskip("psutil")

TIMEOUT = 10
"""--timeout used by the fault tests (seconds)."""
SLACK = 15
"""Seconds beyond the timeout that process start-up (torch imports) and torchrun's shutdown may take."""
BATCH = {"name": "batch", "min": 1, "max": 64}


def _spec(name: str, cols: int, dtype: str = "float32") -> dict:
    return {"name": name, "dtype": dtype, "shape": [BATCH, cols]}


def _engine(root: Path, folder: str, nodes: list, inputs: list[tuple[str, int]], outputs: list[tuple[str, int]],
            weights: dict[str, np.ndarray]) -> dict:  # fmt: skip
    """Write a tiny ONNX model into ``root/folder``; return the manifest's ``run`` step for it."""
    graph = helper.make_graph(
        nodes,
        folder.replace("/", "_"),
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", c]) for n, c in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", c]) for n, c in outputs],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (root / folder).mkdir(parents=True)
    onnx.save(model, root / folder / "model.onnx")
    return {"op": "run", "engine": {
        "folder": folder, "backend": "onnxruntime", "config": {"files": ["model.onnx"], "threads": 1},
        "inputs": [_spec(n, c) for n, c in inputs], "outputs": [_spec(n, c) for n, c in outputs]}}  # fmt: skip


def _mlp(root: Path, folder: str, x: str, y: str, w1: np.ndarray, w2: np.ndarray) -> dict:
    """``y = relu(x @ w1) @ w2``."""
    nodes = [helper.make_node("MatMul", [x, "w1"], ["h0"]), helper.make_node("Relu", ["h0"], ["h1"]),
             helper.make_node("MatMul", ["h1", "w2"], [y])]  # fmt: skip
    return _engine(root, folder, nodes, [(x, w1.shape[0])], [(y, w2.shape[1])], {"w1": w1, "w2": w2})


def _rank(rank, stage, tp_rank, tp_group, steps, *, recv_from=None, recv=(), send_to=None, send=(), outputs=()):
    return {"rank": rank, "stage": stage, "tp_rank": tp_rank, "tp_group": list(tp_group), "recv_from": recv_from,
            "recv": list(recv), "send_to": send_to, "send": list(send), "steps": steps, "outputs": list(outputs)}  # fmt: skip


def _write(root: Path, ranks: list[dict], inputs: list[dict], outputs: list[dict], tp: int, pp: int, mb: int) -> Path:
    manifest = {"kind": "sharded", "world_size": len(ranks), "tp": tp, "pp": pp, "microbatches": mb,
                "backend": "onnxruntime", "inputs": inputs, "outputs": outputs,
                "batch_axis": {s["name"]: 0 for s in inputs}, "ranks": ranks}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def _relu(a):
    return np.maximum(a, 0)


RNG = np.random.default_rng(7)
W1, W2 = RNG.standard_normal((8, 16)), RNG.standard_normal((16, 4))
W3, W4 = RNG.standard_normal((4, 12)), RNG.standard_normal((12, 4))


def tp2_artifact(root: Path) -> Path:
    """TP=2, Megatron-style: W1 by columns, W2 by rows, all_reduce of the partial products."""
    ranks = []
    for t in range(2):
        cols = slice(8 * t, 8 * t + 8)
        steps = [_mlp(root, f"rank{t}/seg0", "x", "partial", W1[:, cols], W2[cols, :]),
                 {"op": "all_reduce", "input": "partial", "output": "y"}]  # fmt: skip
        ranks.append(_rank(t, 0, t, [0, 1], steps, outputs=["y"]))
    return _write(root, ranks, [_spec("x", 8)], [_spec("y", 4)], 2, 1, 1)


def pp2_artifact(root: Path) -> Path:
    """PP=2, three microbatches: stage 1 needs stage 0's ``a`` and the model input ``x``."""
    s0 = [_engine(root, "rank0/seg0", [helper.make_node("MatMul", ["x", "w1"], ["a"])], [("x", 8)], [("a", 16)],
                  {"w1": W1})]  # fmt: skip
    nodes = [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("MatMul", ["x", "w5"], ["skip"]), helper.make_node("Add", ["m", "skip"], ["y"])]  # fmt: skip
    s1 = [_engine(root, "rank1/seg0", nodes, [("a", 16), ("x", 8)], [("y", 4)], {"w2": W2, "w5": W1[:, :4]})]
    ranks = [_rank(0, 0, 0, [0], s0, send_to=1, send=["a", "x"]),
             _rank(1, 1, 0, [1], s1, recv_from=0, recv=["a", "x"], outputs=["y"])]  # fmt: skip
    return _write(root, ranks, [_spec("x", 8)], [_spec("y", 4)], 1, 2, 3)


def tp2pp2_artifact(root: Path) -> Path:
    """TP=2 x PP=2 on four ranks: one Megatron MLP per stage, two microbatches."""
    ranks = []
    for s, (wa, wb, x, y) in enumerate([(W1, W2, "x", "h"), (W3, W4, "h", "y")]):
        half = wa.shape[1] // 2
        for t in range(2):
            cols = slice(half * t, half * (t + 1))
            r = 2 * s + t
            steps = [_mlp(root, f"rank{r}/seg0", x, f"{y}_partial", wa[:, cols], wb[cols, :]),
                     {"op": "all_reduce", "input": f"{y}_partial", "output": y}]  # fmt: skip
            ranks.append(_rank(r, s, t, [2 * s, 2 * s + 1], steps,
                               recv_from=r - 2 if s else None, recv=["h"] if s else [],
                               send_to=None if s else r + 2, send=[] if s else ["h"],
                               outputs=["y"] if s else []))  # fmt: skip
    return _write(root, ranks, [_spec("x", 8)], [_spec("y", 4)], 2, 2, 2)


def gather_artifact(root: Path) -> Path:
    """TP=2 vocabulary-style split of a 7-column projection (4 + 3 columns), then all_gather."""
    ranks = []
    for t, cols in enumerate([slice(0, 4), slice(4, 7)]):
        w = W1[:, :7][:, cols]
        node = helper.make_node("MatMul", ["x", "w"], ["part"])
        steps = [_engine(root, f"rank{t}/seg0", [node], [("x", 8)], [("part", w.shape[1])], {"w": w}),
                 {"op": "all_gather", "input": "part", "output": "y", "axis": -1}]  # fmt: skip
        ranks.append(_rank(t, 0, t, [0, 1], steps, outputs=["y"]))
    return _write(root, ranks, [_spec("x", 8)], [_spec("y", 7)], 2, 1, 1)


def _leftovers(marker: Path) -> list[str]:
    """Processes still alive whose command line names ``marker`` (the artifact folder)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        with np.errstate(), __import__("contextlib").suppress(psutil.Error):
            if str(marker) in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'])[:120]}")
    return found


def _inputs(tmp_path: Path, batch: int) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(batch).standard_normal((batch, 8)).astype(np.float32)
    path = tmp_path / "in.npz"
    np.savez(path, x=x)
    return path, x


def _check_run(artifact: Path, nproc: int, inputs: Path, out: Path, expected: np.ndarray) -> dict:
    result = run_sharded(artifact, nproc, inputs, out, timeout=60)
    with np.load(out, allow_pickle=False) as data:
        y = data["y"]
    assert y.shape == expected.shape
    assert np.max(np.abs(y - expected)) <= 1e-5, np.max(np.abs(y - expected))
    assert len(result["ranks"]) == nproc and all(r["ok"] for r in result["ranks"])
    for r in result["ranks"]:
        assert r["engine_s"] > 0 and r["comm_s"] >= 0 and r["peak_rss_bytes"] > 10_000_000 and r["weights_bytes"] > 0
    assert result["leftover"] == 0 and not _leftovers(artifact)
    return result


# --------------------------------------------------------------------------- correctness


def test_tp2_matches_unsplit(tmp_path):
    artifact = tp2_artifact(tmp_path / "tp2")
    inputs, x = _inputs(tmp_path, 3)
    result = _check_run(artifact, 2, inputs, tmp_path / "out.npz", _relu(x @ W1) @ W2)
    # each rank holds half of W1 and W2
    whole = (W1.size + W2.size) * 4
    assert all(r["weights_bytes"] == whole // 2 for r in result["ranks"])


def test_pp2_three_microbatches(tmp_path):
    artifact = pp2_artifact(tmp_path / "pp2")
    inputs, x = _inputs(tmp_path, 5)  # microbatches of 2, 2 and 1 rows
    result = _check_run(artifact, 2, inputs, tmp_path / "out.npz", _relu(x @ W1) @ W2 + x @ W1[:, :4])
    assert [r["microbatches"] for r in result["ranks"]] == [3, 3]


def test_tp2_pp2_four_processes(tmp_path):
    artifact = tp2pp2_artifact(tmp_path / "tp2pp2")
    inputs, x = _inputs(tmp_path, 4)
    h = _relu(x @ W1) @ W2
    _check_run(artifact, 4, inputs, tmp_path / "out.npz", _relu(h @ W3) @ W4)


def test_all_gather_uneven_through_cli(tmp_path, cli):
    from adapter.cli.launch import launch
    from adapter.cli.main import cli as group

    if "launch" not in group.commands:
        group.add_command(launch)
    artifact = gather_artifact(tmp_path / "gather")
    inputs, x = _inputs(tmp_path, 2)
    out = tmp_path / "out.npz"
    code, stdout, err = cli("launch", artifact, "--nproc", "2", "--inputs", inputs, "--output", out, "--timeout", "60")
    assert code == 0, err
    assert "Ranks" in stdout and "engine s" in stdout and "y: float32[2, 7]" in stdout
    with np.load(out, allow_pickle=False) as data:
        assert np.max(np.abs(data["y"] - x @ W1[:, :7])) <= 1e-5
    assert not _leftovers(artifact)


# --------------------------------------------------------------------------- faults


def _listening(marker: Path) -> list[str]:
    """Listening TCP sockets, visible from this network namespace, of processes whose command line names ``marker``."""
    pids = {p.pid for p in psutil.process_iter(["cmdline"]) if str(marker) in " ".join(p.info["cmdline"] or [])}
    return [f"{c.laddr.ip}:{c.laddr.port} (pid {c.pid})" for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]  # fmt: skip


def _fault_run(artifact: Path, nproc: int, fault: str, tmp_path: Path, sockets: bool = False) -> tuple[str, float]:
    import threading

    inputs, _ = _inputs(tmp_path, 3)
    out = tmp_path / "out.npz"
    env = dict(os.environ, ADAPTER_FAULT=fault)
    seen: list[list[str]] = []
    done = threading.Event()

    def watch():  # while the hung run waits out its timeout: what listens on this machine's interfaces?
        while not done.wait(0.5):
            if sum(str(artifact) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])) > nproc:
                time.sleep(2)
                seen.append(_listening(artifact))
                return

    watcher = threading.Thread(target=watch, daemon=True)
    if sockets:
        watcher.start()
    started = time.perf_counter()
    with pytest.raises(AdapterError) as info:
        run_sharded(artifact, nproc, inputs, out, timeout=TIMEOUT, env=env)
    elapsed = time.perf_counter() - started
    done.set()
    assert not out.exists(), "no output after a failed run"
    assert not _leftovers(artifact), "every process has exited"
    if sockets:
        from adapter.runtime.launch import _private_network

        assert seen, "the run's processes were seen"
        if _private_network() is not None:  # the stores and gloo listen only inside the run's own namespace
            assert seen[0] == []
        else:
            assert all(a.startswith("127.") or a.startswith("*") or a.startswith("::") for a in seen[0])
    return str(info.value), elapsed


def test_rank_killed(tmp_path):
    message, elapsed = _fault_run(tp2pp2_artifact(tmp_path / "a"), 4, "die:rank=1,at=step1", tmp_path)
    assert "rank 1 (stage 0, tp 1) died (killed by SIGKILL)" in message
    assert elapsed < TIMEOUT + SLACK


@pytest.mark.parametrize(
    "make, nproc, fault, expected",
    [
        (pp2_artifact, 2, "hang:rank=0,at=step0,mb=1",
         "rank 1 (stage 1, tp 0): no data from rank 0 (stage 0, tp 0) within 10 s (receiving microbatch 1)"),
        (tp2_artifact, 2, "hang:rank=1,at=init",  # a rendezvous that never completes
         "rank 0 (stage 0, tp 0): no data from rank 1 (stage 0, tp 1) within 10 s (forming the process group)"),
    ],
    ids=["mid-run", "rendezvous"],
)  # fmt: skip
def test_rank_hung(tmp_path, make, nproc, fault, expected):
    message, elapsed = _fault_run(make(tmp_path / "a"), nproc, fault, tmp_path, sockets=True)
    assert expected in message
    hung = int(fault.split("rank=")[1].split(",")[0])
    assert f"rank {hung} (stage" in message and "stopped responding" in message
    assert TIMEOUT <= elapsed < TIMEOUT + SLACK


def test_nproc_mismatch_launches_nothing(tmp_path, cli):
    from adapter.cli.launch import launch
    from adapter.cli.main import cli as group

    if "launch" not in group.commands:
        group.add_command(launch)
    artifact = tp2_artifact(tmp_path / "tp2")
    started = time.perf_counter()
    code, out, err = cli("launch", artifact, "--nproc", "3", "--timeout", TIMEOUT)
    assert code == ArtifactError.exit_code and "Traceback" not in err
    assert "sharded over 2 ranks (tp 2 x pp 1), but --nproc 3 x --nnodes 1 gives 3 processes; nothing was launched" in err
    assert time.perf_counter() - started < 2 and not _leftovers(artifact)


def test_port_in_use(tmp_path):
    import socket

    artifact = tp2_artifact(tmp_path / "tp2")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(AdapterError, match=r"Port \d+ on 127.0.0.1 is already in use"):
            run_sharded(artifact, 2, master_port=busy.getsockname()[1], timeout=TIMEOUT)
    with pytest.raises(AdapterError, match="not an address of this machine"):
        run_sharded(artifact, 2, master_addr="192.0.2.1", timeout=TIMEOUT)


# --------------------------------------------------------------------------- pieces


def test_multinode_prints_commands(tmp_path, cli):
    from adapter.cli.launch import launch
    from adapter.cli.main import cli as group

    if "launch" not in group.commands:
        group.add_command(launch)
    artifact = tp2pp2_artifact(tmp_path / "a")
    code, out, err = cli("launch", artifact, "--nproc", "2", "--nnodes", "2", "--master-addr", "10.0.0.1",
                         "--inputs", "in.npz")  # fmt: skip
    assert code == 0, err
    assert out.count("torchrun --nproc-per-node 2 --nnodes 2") == 2 and "--node-rank 1" in out
    code, out, err = cli("launch", artifact, "--nproc", "2", "--nnodes", "2", "--inputs", "in.npz")
    assert code != 0 and "needs the rendezvous on an address the other nodes reach" in err
    cmd = torchrun_command(artifact, 2, Path("i.npz"), Path("o.npz"), 60, master_port=1234)
    assert "127.0.0.1:1234" in cmd and "--max-restarts" in cmd


def test_fault_hook_and_split():
    assert parse_fault("die:rank=1,at=step2").point == "step2"
    assert parse_fault("hang:rank=3").kind == "hang"
    with pytest.raises(AdapterError):
        parse_fault("explode:rank=1")
    parts = split_microbatches({"x": np.arange(10).reshape(5, 2), "w": np.ones(3)}, {"x": 0}, 3)
    assert [p["x"].shape[0] for p in parts] == [2, 2, 1] and all(p["w"].shape == (3,) for p in parts)


def test_random_inputs_follow_the_specs():
    from adapter.runtime.launch import random_inputs

    ids = {"name": "input_ids", "dtype": "int64", "shape": [BATCH, {"name": "seq", "min": 1, "max": 512}]}
    mask = {"name": "attention_mask", "dtype": "int64", "shape": [BATCH, {"name": "seq", "min": 1, "max": 512}]}
    feed = random_inputs({"inputs": [ids, mask, _spec("x", 8)], "batch_axis": {"input_ids": 0}, "microbatches": 3})
    assert feed["input_ids"].shape == feed["attention_mask"].shape == (3, 8) and feed["x"].shape == (3, 8)
    assert feed["input_ids"].max() < 100 and (feed["attention_mask"] == 1).all() and feed["x"].dtype == np.float32
