"""Every Triton kernel of adapter.kernels on a GPU: correctness against a PyTorch reference,
time against PyTorch eager (cuBLAS GEMMs, fused SDPA for attention), achieved bandwidth and
FLOP/s as a fraction of the GPU's peak, and the tile model's predicted time beside the measured.

    python kernels/device_check.py [--profile nvidia-h100] [--peak-bandwidth 3.35e12] [--top 4] [--json out.json]
    python kernels/device_check.py --smoke     # tiny shapes on the CPU interpreter (what the test-suite runs)

For each problem (LLM and encoder shapes) the tile model ranks the kernel's configurations
for the profile; the ``--top`` best are measured (``triton.testing.do_bench``, median) and the
fastest measured is reported with the model's rank of it. The peak bandwidth is the profile's
unless ``--peak-bandwidth`` is given (an H200 under the H100 profile: 4.8e12); a device-to-device
copy's bandwidth is printed as the achievable reference. Plan it to fit a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from adapter.kernels import KERNELS  # noqa: E402
from adapter.kernels.int4_gemm import pack_int4  # noqa: E402
from adapter.kernels.tuning import ITEMSIZE, rank  # noqa: E402
from adapter.profiles import load_profile  # noqa: E402

FULL = {
    "attention prefill (GQA 64/8, causal)": ("attention", {"batch": 1, "q_heads": 64, "kv_heads": 8, "m": 2048, "n": 2048,
                                                           "head_dim": 128, "causal": 1}),
    "attention decode (GQA 64/8, 4096 past)": ("attention", {"batch": 8, "q_heads": 64, "kv_heads": 8, "m": 1,
                                                             "n": 4096, "head_dim": 128, "causal": 1}),
    "attention encoder (masked, 12 heads)": ("attention", {"batch": 32, "q_heads": 12, "kv_heads": 12, "m": 128,
                                                           "n": 128, "head_dim": 64, "mask": 1}),
    "add_rmsnorm 4096x8192": ("add_rmsnorm", {"rows": 4096, "n": 8192}),
    "add_layernorm 4096x1024": ("add_layernorm", {"rows": 4096, "n": 1024}),
    "bias_gelu 4096x4096": ("bias_gelu", {"rows": 4096, "n": 4096}),
    "rotary 32x2048x128": ("rotary", {"batch": 1, "heads": 32, "seq": 2048, "head_dim": 128}),
    "int4_gemm decode 1x28672x8192": ("int4_gemm", {"m": 1, "n": 28672, "k": 8192, "group": 128}),
    "int4_gemm prefill 512x28672x8192": ("int4_gemm", {"m": 512, "n": 28672, "k": 8192, "group": 128}),
}
SMOKE = {
    "attention decode": ("attention", {"batch": 1, "q_heads": 4, "kv_heads": 2, "m": 1, "n": 40, "head_dim": 32,
                                       "causal": 1}),
    "attention masked": ("attention", {"batch": 2, "q_heads": 2, "kv_heads": 2, "m": 8, "n": 8, "head_dim": 16,
                                       "mask": 1}),
    "add_rmsnorm": ("add_rmsnorm", {"rows": 3, "n": 256}),
    "add_layernorm": ("add_layernorm", {"rows": 3, "n": 128}),
    "bias_gelu": ("bias_gelu", {"rows": 3, "n": 64}),
    "rotary": ("rotary", {"batch": 1, "heads": 2, "seq": 5, "head_dim": 32}),
    "int4_gemm": ("int4_gemm", {"m": 2, "n": 64, "k": 128, "group": 32}),
}


def _inputs(name: str, p: dict, dtype, device) -> tuple[list, dict]:
    """(tensors, keyword arguments) of a launch, random."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    if name == "attention":
        q = rand(p["batch"], p["q_heads"], p["m"], p["head_dim"])
        k, v = (rand(p["batch"], p["kv_heads"], p["n"], p["head_dim"]) for _ in range(2))
        mask = None
        if p.get("mask"):
            mask = torch.zeros(p["batch"], 1, p["m"], p["n"], dtype=dtype, device=device)
            mask[0, ..., : p["n"] // 4] = torch.finfo(dtype).min
        return [q, k, v, mask], {"causal": bool(p.get("causal"))}
    if name in ("add_rmsnorm", "add_layernorm"):
        x, r, w, b = rand(p["rows"], p["n"]), rand(p["rows"], p["n"]), rand(p["n"]), rand(p["n"])
        return [x, r, w, b if name == "add_layernorm" else None], {}
    if name == "bias_gelu":
        return [rand(p["rows"], p["n"]), rand(p["n"])], {}
    if name == "rotary":
        half = p["head_dim"] // 2
        angles = torch.arange(p["seq"] + 16)[:, None] / 10000 ** (torch.arange(half)[None] / half)
        positions = torch.arange(p["seq"], device=device)[None].repeat(p["batch"], 1) + 3
        return [rand(p["batch"], p["heads"], p["seq"], p["head_dim"]), angles.cos().to(device, dtype),
                angles.sin().to(device, dtype), positions], {}
    weight = torch.randn(p["n"], p["k"], generator=g).numpy()
    packed, scales, _ = pack_int4(weight, p["group"])
    return [rand(p["m"], p["k"]), torch.from_numpy(packed).to(device), torch.from_numpy(scales).to(device, dtype),
            None], {"group": p["group"]}


def _eager(name: str, args: list, kwargs: dict):
    """The unfused PyTorch version (fp32 math where ``reference``; the device's own otherwise)."""
    if name == "attention":
        q, k, v, mask = args
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        if kwargs["causal"]:
            m, n = q.shape[2], k.shape[2]
            allowed = torch.arange(n, device=q.device)[None] <= (n - m) + torch.arange(m, device=q.device)[:, None]
            causal = torch.zeros(m, n, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
            mask = causal if mask is None else mask + causal
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if name in ("add_rmsnorm", "add_layernorm"):
        x, r, w, b = args
        h = x + r
        if name == "add_layernorm":
            return F.layer_norm(h, (h.shape[-1],), w, b, 1e-5), h
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w, h
    if name == "bias_gelu":
        return F.gelu(args[0] + args[1])
    if name == "rotary":
        x, cos, sin, positions = args
        c, s = cos[positions][:, None], sin[positions][:, None]
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    a, packed, scales, _ = args
    q = torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1).to(a.dtype)
    group = kwargs["group"]
    w = (q - 8) * scales.repeat_interleave(group, 1)
    return a @ w.T


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _bench(fn) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50))
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="nvidia-h100")
    parser.add_argument("--peak-bandwidth", type=float, default=None)
    parser.add_argument("--top", type=int, default=4, help="Configurations measured per problem (the model's best).")
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes on the CPU interpreter, one config each.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        print("device_check: no CUDA GPU here (torch.cuda sees none); run with --smoke for the CPU interpreter.")
        return 2
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    peak_bw = args.peak_bandwidth or profile.memory_bandwidth
    peak_flops = profile.peak_flops.get("bf16" if gpu else "fp32")
    if gpu:
        block = torch.empty(1 << 28, dtype=torch.uint8, device=device)
        copy_ms = _bench(lambda: block.clone())
        print(f"{torch.cuda.get_device_name()}: device copy {2 * block.numel() / copy_ms / 1e9:.0f} GB/s; "
              f"peak used {peak_bw / 1e12:.2f} TB/s ({'given' if args.peak_bandwidth else profile.name})")
    rows = []
    for label, (name, problem) in (SMOKE if args.smoke else FULL).items():
        kernel = KERNELS[name]
        ranked = [p for p in rank(kernel, problem, profile, "bf16" if gpu else "fp32") if p.feasible]
        tensors, kwargs = _inputs(name, problem, dtype, device)
        want = _first(_eager(name, [t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in tensors],
                             kwargs))  # fmt: skip
        measured = []
        for position, guess in enumerate(ranked[: 1 if args.smoke else args.top]):
            got = _first(kernel.launch(guess.config, *tensors, **kwargs))
            error = float((got.float() - want).abs().max() / max(1.0, float(want.abs().max())))
            ms = _bench(lambda c=guess.config, k=kernel, t=tensors, kw=kwargs: k.launch(c, *t, **kw))
            measured.append((ms, position, guess, error))
        ms, position, guess, error = min(measured, key=lambda m: m[0])
        eager_ms = _bench(lambda n=name, t=tensors, kw=kwargs: _eager(n, t, kw))
        itemsize = ITEMSIZE["bf16" if gpu else "fp32"]
        least = min(w.bytes - w.reread for w in (kernel.work(problem, p.config, itemsize) for p in ranked))
        rows.append({
            "problem": label, "kernel": name, "config": guess.config.key(), "model_rank": position + 1,
            "predicted_us": guess.time_s * 1e6, "measured_us": ms * 1e3, "eager_us": eager_ms * 1e3,
            "speedup_vs_eager": eager_ms / ms, "bandwidth_fraction": least / (ms * 1e-3) / peak_bw,
            "predicted_bandwidth_fraction": guess.bandwidth_fraction,
            "flops_fraction": guess.flops / (ms * 1e-3) / peak_flops, "max_rel_error": error,
            "ok": error <= (1e-5 if dtype == torch.float32 else 2e-2),
        })  # fmt: skip
    print("| problem | config (model rank) | predicted us | measured us | eager us | x eager | of peak BW "
          "(predicted) | of peak FLOP/s | max rel err | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['config']} ({r['model_rank']}) | {r['predicted_us']:.1f} | {r['measured_us']:.1f} "
              f"| {r['eager_us']:.1f} | {r['speedup_vs_eager']:.2f} | {100 * r['bandwidth_fraction']:.0f}% "
              f"({100 * r['predicted_bandwidth_fraction']:.0f}%) | {100 * r['flops_fraction']:.1f}% | "
              f"{r['max_rel_error']:.1e} | {'yes' if r['ok'] else 'NO'} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name() if gpu else "cpu (interpreter)", "rows": rows}, handle,
                      indent=2)  # fmt: skip
    return 0 if all(r["ok"] for r in rows) and not any(math.isnan(r["max_rel_error"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
