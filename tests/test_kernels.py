"""adapter.kernels: every Triton kernel against its NumPy reference on the CPU interpreter
(``TRITON_INTERPRET=1``, set in conftest), on zoo and LLM shapes with ragged and masked
cases; the tile model's ranking and constraints; ahead-of-time cubins for sm_90 / sm_80 and
an hsaco for gfx942, checked with cuobjdump and llvm-readelf."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter.kernels import KERNELS
from adapter.kernels.aot import bundle, compile_kernel
from adapter.kernels.int4_gemm import pack_int4
from adapter.kernels.spec import Config
from adapter.kernels.tuning import predict, rank
from adapter.profiles import load_profile

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs on the Triton interpreter")
TOL = {np.float32: 1e-5, np.float16: 1e-2}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _close(got: torch.Tensor, want: np.ndarray, dtype) -> None:
    got = got.numpy().astype(np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want.astype(np.float64)).max() <= TOL[dtype] * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("rows", "n", "block"), [(8, 1536, 1024), (3, 1000, 256)])  # MiniLM MLP; ragged
def test_bias_gelu(dtype, rows, n, block):
    rng = np.random.default_rng(0)
    x, b = rng.normal(size=(rows, n)).astype(dtype), rng.normal(size=n).astype(dtype)
    kernel = KERNELS["bias_gelu"]
    _close(kernel.launch(Config({"BLOCK": block}, 4), _t(x), _t(b)), kernel.reference(x, b), dtype)


@pytest.mark.parametrize(("name", "n", "block"), [("add_layernorm", 384, 512), ("add_layernorm", 300, 128),
                                                  ("add_rmsnorm", 2048, 2048), ("add_rmsnorm", 2048, 512)])  # fmt: skip
def test_residual_add_and_norm_one_pass_and_looped(name, n, block):
    rng = np.random.default_rng(1)
    x, r = rng.normal(3.0, 2.0, size=(5, n)).astype(np.float32), rng.normal(size=(5, n)).astype(np.float32)
    w, b = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    kernel = KERNELS[name]
    bias = b if name == "add_layernorm" else None
    eps = 1e-5 if name == "add_layernorm" else 1e-6
    y, h = kernel.launch(Config({"BLOCK": block}, 4), _t(x), _t(r), _t(w), None if bias is None else _t(bias), eps)
    want_y, want_h = kernel.reference(x, r, w, bias, eps)
    _close(h, want_h, np.float32)
    _close(y, want_y, np.float32)


@pytest.mark.parametrize("block", [1, 4, 16])
def test_rotary_at_left_padded_and_decode_positions(block):
    rng = np.random.default_rng(2)
    half = 32
    inv = 1.0 / 10000 ** (np.arange(half) / half)
    angles = np.arange(64)[:, None] * inv[None]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    kernel = KERNELS["rotary"]
    for positions in (np.array([[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]]), np.array([[37], [12]])):
        x = rng.normal(size=(2, 4, positions.shape[1], 2 * half)).astype(np.float32)
        got = kernel.launch(Config({"BLOCK_S": block}, 2), _t(x), _t(cos), _t(sin), _t(positions.astype(np.int64)))
        _close(got, kernel.reference(x, cos, sin, positions), np.float32)


def _padding_mask(batch: int, m: int, n: int, pads: list[int]) -> np.ndarray:
    mask = np.zeros((batch, 1, m, n), np.float32)
    for i, pad in enumerate(pads):
        mask[i, :, :, :pad] = np.finfo(np.float32).min
    return mask


ATTENTION_CASES = {
    # MiniLM-like encoder rows: 12 heads, head 32, padded keys in the second sentence
    "encoder, padded": dict(b=2, hq=12, hk=12, m=16, n=16, d=32, pads=[0, 5], causal=False),
    # GQA prefill over a cache (past 7), causal, left padding
    "gqa prefill, causal": dict(b=2, hq=8, hk=2, m=5, n=12, d=64, pads=[3, 0], causal=True),
    # TinyLlama-shaped decode: 32 query heads on 4 KV heads, one new token, ragged context
    "gqa decode": dict(b=2, hq=32, hk=4, m=1, n=33, d=64, pads=[0, 9], causal=True),
    # a head size that is no power of two (Phi-2's 80): masked head dimension
    "head 80": dict(b=1, hq=4, hk=4, m=7, n=7, d=80, pads=[0], causal=True),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize(("bm", "bn", "split"), [(16, 16, 1), (32, 64, 1), (16, 16, 3)])
def test_attention_prefill_and_decode(case, bm, bn, split):
    c = ATTENTION_CASES[case]
    rng = np.random.default_rng(3)
    q = rng.normal(size=(c["b"], c["hq"], c["m"], c["d"])).astype(np.float32)
    k, v = (rng.normal(size=(c["b"], c["hk"], c["n"], c["d"])).astype(np.float32) for _ in range(2))
    mask = _padding_mask(c["b"], c["m"], c["n"], c["pads"])
    kernel = KERNELS["attention"]
    config = Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT": split}, 4)  # split: keys in 3 parts, then combined
    got = kernel.launch(config, _t(q), _t(k), _t(v), _t(mask), c["causal"])
    _close(got, kernel.reference(q, k, v, mask, c["causal"]), np.float32)


@pytest.mark.parametrize(("m", "n", "k", "group", "symmetric", "bk"), [
    (3, 96, 256, 32, True, 32), (1, 100, 256, 64, False, 64), (20, 64, 128, 128, False, 128)])  # fmt: skip
def test_int4_gemm_matches_dequantized_weights(m, n, k, group, symmetric, bk):
    rng = np.random.default_rng(4)
    a, weight = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(n, k)).astype(np.float32)
    packed, scales, zeros = pack_int4(weight, group, symmetric)
    kernel = KERNELS["int4_gemm"]
    config = Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": bk}, 4)
    got = kernel.launch(config, _t(a), _t(packed), _t(scales), None if zeros is None else _t(zeros), group)
    want = kernel.reference(a, packed, scales, zeros, group)
    _close(got, want, np.float32)
    assert np.abs(want - a @ weight.T).max() < 0.25 * np.abs(a @ weight.T).max()  # the packing is INT4 of w


PROBLEMS = {
    "attention": {"batch": 1, "q_heads": 32, "kv_heads": 4, "m": 512, "n": 512, "head_dim": 128, "causal": 1},
    "bias_gelu": {"rows": 8 * 512, "n": 3072},  # BERT-base MLP, batch 8 x 512
    "add_layernorm": {"rows": 8 * 128, "n": 384},
    "add_rmsnorm": {"rows": 4096, "n": 8192},
    "rotary": {"batch": 1, "heads": 32, "seq": 512, "head_dim": 128},
}


@pytest.mark.parametrize("target", ["nvidia-h100", "amd-mi300x"])
def test_the_tile_model_ranks_each_space_and_rejects_what_does_not_fit(target):
    profile = load_profile(target)
    for name, problem in PROBLEMS.items():
        ranked = rank(KERNELS[name], problem, profile, "fp16")
        best, feasible = ranked[0], [p for p in ranked if p.feasible]
        assert best.feasible and 0 < best.bandwidth_fraction <= 1 and 0 < best.flops_fraction <= 1, (name, best)
        assert best.time_s <= min(p.time_s for p in feasible)
        if name in ("add_rmsnorm", "int4_gemm", "bias_gelu"):  # memory-bound: the best tile streams near the peak
            assert best.bound == "memory" and best.bandwidth_fraction >= 0.7, (name, best.to_json())
        if name in ("add_rmsnorm", "int4_gemm"):  # the tile choice matters: the worst config is far off
            assert feasible[-1].bandwidth_fraction < 0.6 * best.bandwidth_fraction, (name, feasible[-1].to_json())
    big = Config({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 3)
    verdict = predict(KERNELS["attention"], PROBLEMS["attention"], big, profile, "fp32")
    if target == "amd-mi300x":  # (128x128 + 2x128x128x3) x 4 B of tiles: over the 64 KB of LDS
        assert not verdict.feasible and "shared memory" in verdict.reason
    else:
        assert not verdict.feasible or verdict.blocks_per_sm >= 1


def _cuobjdump() -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = shutil.which("cuobjdump") or (str(bundled) if bundled.is_file() else None)
    if found is None:
        pytest.fail("cuobjdump is missing (triton's wheel bundles it; nvidia-cuda-cuobjdump installs it)")
    return found


@pytest.mark.parametrize("arch", ["sm_90", "sm_80", "gfx942"])
def test_kernels_compile_ahead_of_time_and_bundle(arch, tmp_path):
    profile = load_profile({"sm_90": "nvidia-h100", "sm_80": "nvidia-a100", "gfx942": "amd-mi300x"}[arch])
    problems = {name: (KERNELS[name], problem) for name, problem in PROBLEMS.items()}
    problems["attention_decode"] = (KERNELS["attention"], {**PROBLEMS["attention"], "m": 1, "n": 4096})
    entries = bundle(tmp_path / "kernels", profile, problems, "fp16", cache=tmp_path / "cache")
    # a decode step splits its keys (few programs otherwise): its combine kernel comes along
    assert {e["name"] for e in entries} == {*problems, "attention_decode.combine"}
    decode = next(e for e in entries if e["name"] == "attention_decode")
    assert decode["constants"]["SPLIT"] > 1 and decode["grid"][2] == decode["constants"]["SPLIT"]
    for entry in entries:
        binary = tmp_path / "kernels" / entry["files"][0]
        assert entry["arch"] == arch and entry["symbol"] and entry["grid"]
        assert entry.get("companion_of") or entry["predicted"]["feasible"]
        if arch.startswith("sm_"):
            listing = subprocess.run([_cuobjdump(), "--list-elf", str(binary)], capture_output=True, text=True)
            assert listing.returncode == 0 and arch in listing.stdout, listing.stdout + listing.stderr
            assert (tmp_path / "kernels" / entry["files"][1]).read_text().count(".entry") == 1  # the PTX
        else:
            notes = subprocess.run(["llvm-readelf", "--notes", str(binary)], capture_output=True, text=True)
            target = [line for line in notes.stdout.splitlines() if "amdhsa.target" in line]
            assert notes.returncode == 0 and target and target[0].rstrip().endswith("gfx942"), notes.stdout[-2000:]
    # the second compile of the same configuration is the cached one
    kernel, problem = problems["rotary"]
    first = compile_kernel(kernel, problem, Config({"BLOCK_S": 4}, 2), arch, "fp16", tmp_path / "cache")
    again = compile_kernel(kernel, problem, Config({"BLOCK_S": 4}, 2), arch, "fp16", tmp_path / "cache")
    assert first.binary == again.binary and json.loads((first.binary.parent / "meta.json").read_text())["arch"] == arch


def _check_binary(path: Path, arch: str) -> None:
    if arch.startswith("sm_"):
        listing = subprocess.run([_cuobjdump(), "--list-elf", str(path)], capture_output=True, text=True)
        assert listing.returncode == 0 and arch in listing.stdout, listing.stdout + listing.stderr
    else:
        notes = subprocess.run(["llvm-readelf", "--notes", str(path)], capture_output=True, text=True)
        target = [line for line in notes.stdout.splitlines() if "amdhsa.target" in line]
        assert notes.returncode == 0 and target and target[0].rstrip().endswith(arch), notes.stdout[-2000:]


@pytest.mark.parametrize(("target", "backend", "arch"), [("nvidia-h100", "tensorrt", "sm_90"),
                                                         ("amd-mi300x", "migraphx", "gfx942")])  # fmt: skip
def test_convert_to_a_gpu_target_bundles_the_kernels(target, backend, arch, tmp_path, cli):
    """MiniLM to a GPU target (sm_80 cubins: the ahead-of-time test above): its residual+LayerNorm, bias+GELU and masked attention patterns
    get kernels compiled for the target's architecture, inside the artifact's checksums; the
    TensorRT recipe lists them as plugins; the report shows the tile model's choice."""
    from adapter.core import artifact

    code, out, err = cli("convert", "adapter.zoo:minilm", "--target", target, "--backend", backend, "-o",
                         str(tmp_path / "engine"))  # fmt: skip
    assert code == 0, err
    manifest = artifact.validate(tmp_path / "engine")  # the kernel files are in the manifest's checksums
    kernels = {k["name"]: k for k in manifest["backend"]["config"]["triton_kernels"]}
    assert set(kernels) == {"attention", "add_layernorm", "bias_gelu"}
    assert len(kernels["attention"]["nodes"]) == 6 and len(kernels["add_layernorm"]["nodes"]) == 12
    assert kernels["attention"]["problem"]["mask"] == 1 and kernels["attention"]["problem"]["head_dim"] == 32
    for kernel in kernels.values():
        assert kernel["arch"] == arch and kernel["predicted"]["feasible"] and 0 < kernel["predicted"]["time_us"]
        _check_binary(tmp_path / "engine" / kernel["files"][0], arch)
    if backend == "tensorrt":
        plugins = json.loads((tmp_path / "engine" / "plugins.json").read_text())["tensorrt_plugins"]
        assert {p["plugin"] for p in plugins} == {f"adapter::{name}" for name in kernels}
    assert f"Triton kernels for {arch}" in out


def test_the_device_check_runs_on_the_interpreter():
    """kernels/device_check.py --smoke: every kernel, tiny shapes, the model's best config,
    against PyTorch on the CPU (the GPU run is the same script without --smoke)."""
    import sys

    done = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "kernels" / "device_check.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "problem" not in line]
    assert len(rows) == 7 and all(row.rstrip().endswith("| yes |") for row in rows), done.stdout


def test_patterns_the_kernels_do_not_compute_are_left_alone():
    """tanh-GELU is not the erf kernel; an empty example dimension launches nothing."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from adapter.core.errors import AdapterError
    from adapter.kernels.plan import problems_in

    def graph(approximate: str):
        bias = helper.make_tensor("b", TensorProto.FLOAT, [8], np.ones(8, np.float32))
        nodes = [helper.make_node("Add", ["x", "b"], ["h"]), helper.make_node("Gelu", ["h"], ["y"], approximate=approximate)]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 8])], [bias])  # fmt: skip
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
        return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))

    assert set(problems_in(graph("none"), {"rows": 4})) == {"bias_gelu"}
    assert problems_in(graph("tanh"), {"rows": 4}) == {}
    assert problems_in(graph("none"), {"rows": 0}) == {}
    with pytest.raises(AdapterError, match="empty dimension"):
        rank(KERNELS["bias_gelu"], {"rows": 0, "n": 8}, load_profile("nvidia-h100"))


def test_a_frame_longer_than_the_limit_is_refused():
    import socket

    from adapter.runtime.frames import pack, recv_frame, send_frame

    left, right = socket.socketpair()
    with left, right:
        send_frame(left, pack({"op": "decode"}, [np.zeros(4, np.float32)]))
        assert recv_frame(right) is not None
        left.sendall((1 << 40).to_bytes(8, "little"))
        with pytest.raises(ValueError, match="more than"):
            recv_frame(right)
