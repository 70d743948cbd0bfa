"""adapter's generation engines against transformers eager, in one run on this machine.

    python benchmarks/llm_peers.py --make-tinyllama build/tinyllama      # writes the random model once
    python benchmarks/llm_peers.py --model build/tinyllama [--weights fp32,int8,int4]
        [--backends onnxruntime,openvino] [--batches 1,4] [--prompt 128] [--new 128]
        [--rounds 6] [--threads 2] [--json build/llm_peers.json]

The model: a TinyLlama-1.1B-shaped Llama with random weights (hidden 2048, 22 layers, 32
heads, 4 KV heads, MLP 5632, vocabulary 32000), written as a Hugging Face folder; nothing
comes from a hub. Engines: adapter's decoder per backend and weight format (converted once,
cached in the output folder), transformers eager FP32 and BF16 (greedy, its own KV cache).
Each round runs every engine once per batch size (rotating, so background load hits all
alike); a row is the median over rounds of time to first token (prefill of the prompt)
and decode tokens/s (new tokens after the first, over their time), with the weight bytes
read per token over the host's probed memory bandwidth as the decode bound.

ONNX Runtime GenAI (``pip install onnxruntime-genai==0.18.0``) runs when installed: its
model builder converts the same folder (INT4 and FP32, cached beside adapter's engines).
CTranslate2 (``pip install ctranslate2==4.8.5``) runs when installed: its Transformers
converter writes INT8 and BF16 models of the same folder. llama.cpp (``pip install
llama-cpp-python==0.3.36 gguf==0.19.0``) runs when installed: Q4_0 and Q8_0 by its own
quantizer, batch 1 through its ``Llama`` API (see :class:`LlamaCpp`). OpenVINO GenAI runs
from its own environment when ``--ov-genai-python`` exists (see :class:`OpenVINOGenAI`).
Peers that are absent get no rows; rows are not made up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adapter.backends._llamacpp_decoder import write_gguf
from adapter.llm.convert import LLMOptions, convert_causal_lm
from adapter.llm.engine import LLMEngine
from adapter.llm.export import layout_of
from adapter.llm.families import load_causal_lm, write_random_folder, write_word_tokenizer
from adapter.llm.verify import kl_against_eager
from adapter.profiles import load_profile

TINYLLAMA = {
    "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
    "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}  # fmt: skip
PEER_PACKAGES = {
    "onnxruntime-genai": "onnxruntime_genai",
    "openvino-genai": "openvino_genai",
    "ctranslate2": "ctranslate2",
    "llama-cpp-python": "llama_cpp",
}
WIRED = {"onnxruntime-genai", "ctranslate2", "llama-cpp-python", "openvino-genai"}


def make_tinyllama(folder: Path, **overrides) -> Path:
    """Write the TinyLlama-shaped random model (BF16 on disk, like the published one) and a
    word-level tokenizer beside it."""
    from transformers import LlamaConfig

    config = LlamaConfig(**{**TINYLLAMA, **overrides})
    if not (folder / "config.json").is_file():
        write_random_folder(config, folder, dtype=torch.bfloat16)
    if not (folder / "tokenizer.json").is_file():
        write_word_tokenizer(folder, config.vocab_size)
    return folder


def _prompts(vocab: int, batch: int, length: int, round_: int) -> list[list[int]]:
    """New prompts every round: an engine that caches prefixes (OpenVINO GenAI's pipeline
    does) must not see the same prompt twice."""
    rng = np.random.default_rng([round_, batch])
    return [rng.integers(3, vocab, size=length).tolist() for _ in range(batch)]


def _convert(command: list[str], what: str) -> float:
    """Run a peer's own converter once; its seconds (its stderr's tail when it fails)."""
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


class Eager:
    """transformers eager, greedy with its own DynamicCache."""

    def __init__(self, model, dtype: torch.dtype) -> None:
        self.model = model.to(dtype)
        self.name = f"transformers eager {str(dtype).removeprefix('torch.')}"

    def run(self, prompts: list[list[int]], new: int) -> tuple[float, float]:
        from transformers import DynamicCache

        ids = torch.tensor(prompts)
        mask = torch.ones_like(ids)
        cache = DynamicCache()
        with torch.no_grad():
            start = time.perf_counter()
            out = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            first = time.perf_counter()
            for _ in range(new - 1):
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                out = self.model(
                    input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True
                )
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            end = time.perf_counter()
        return (first - start) * 1e3, (new - 1) * len(prompts) / (end - first)


class Adapter:
    def __init__(self, folder: Path, name: str) -> None:
        self.engine = LLMEngine.load(folder)
        self.name = name

    def run(self, prompts: list[list[int]], new: int) -> tuple[float, float]:
        result = self.engine.generate(prompts, max_new_tokens=new, stop_at_eos=False)
        return result.ttft_ms, result.decode_tokens_per_s


class OrtGenAI:
    """ONNX Runtime GenAI: its own model builder (local folder, CPU) and its greedy generator.

    The builder runs once per precision (``int4``: block 32, accuracy level 4, its CPU
    defaults; ``fp32``); the session threads are set in the ``genai_config.json`` it writes.
    """

    def __init__(self, model: Path, out: Path, precision: str, threads: int) -> None:
        import onnxruntime_genai as og

        if not (out / "genai_config.json").is_file():
            command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
                       "-p", precision, "-e", "cpu", "-c", str(out.parent / "ort-genai-cache")]  # fmt: skip
            self.convert_seconds = _convert(command, "ONNX Runtime GenAI's builder")
        config_path = out / "genai_config.json"
        config = json.loads(config_path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
        config_path.write_text(json.dumps(config, indent=2))
        self.og = og
        self.model = og.Model(str(out))
        self.folder = out
        self.name = f"onnxruntime-genai {precision}"

    def start(self, batch: int, capacity: int) -> None:
        """The DecoderSession protocol, for adapter's own KL check on this engine."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=capacity, do_sample=False, batch_size=batch)
        self.generator = self.og.Generator(self.model, params)

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self.generator.append_tokens(ids.astype(np.int32))
        return np.asarray(self.generator.get_output("logits"), np.float32)

    def run(self, prompts: list[list[int]], new: int) -> tuple[float, float]:
        self.start(len(prompts), len(prompts[0]) + new)
        generator = self.generator
        start = time.perf_counter()
        generator.append_tokens(np.array(prompts, np.int32))
        generator.generate_next_token()
        first = time.perf_counter()
        for _ in range(new - 1):
            generator.generate_next_token()
        end = time.perf_counter()
        return (first - start) * 1e3, (new - 1) * len(prompts) / (end - first)


class CTranslate2:
    """CTranslate2: its Transformers converter (``--quantization int8|bfloat16``) and its
    Generator, greedy (``sampling_topk=1``), every row run to ``new`` tokens (no end token).

    Time to first token is the first step callback; decode tok/s counts the remaining steps
    of all rows over their time. It takes token strings: ids map through its vocabulary.
    """

    def __init__(self, model: Path, out: Path, compute: str, threads: int) -> None:
        import ctranslate2

        if not (out / "model.bin").is_file():
            command = [sys.executable, "-m", "ctranslate2.converters.transformers", "--model", str(model),
                       "--output_dir", str(out), "--quantization", compute, "--force"]  # fmt: skip
            self.convert_seconds = _convert(command, "CTranslate2's converter")
        self.vocab = json.loads((out / "vocabulary.json").read_text())
        self.generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute, intra_threads=threads)
        self.folder = out
        self.name = f"ctranslate2 {compute}"

    def start(self, batch: int, capacity: int) -> None:
        """The DecoderSession protocol (whole sequences only), for adapter's own KL check."""

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        logits = self.generator.forward_batch([[self.vocab[int(i)] for i in row] for row in ids])
        return np.asarray(logits, np.float32)

    def run(self, prompts: list[list[int]], new: int) -> tuple[float, float]:
        tokens = [[self.vocab[i] for i in p] for p in prompts]
        first: list[float] = []

        def step(result) -> bool:
            if not first:
                first.append(time.perf_counter())
            return False

        start = time.perf_counter()
        self.generator.generate_batch(
            tokens, max_length=new, min_length=new, end_token=[], sampling_topk=1,
            include_prompt_in_result=False, callback=step,
        )  # fmt: skip
        end = time.perf_counter()
        return (first[0] - start) * 1e3, (new - 1) * len(prompts) / (end - first[0])


class LlamaCpp:
    """llama.cpp through llama-cpp-python's own ``Llama`` API, batch 1 (that API runs one
    sequence), greedy over its ``eval``; its GGUF quantized by llama.cpp's own quantizer
    with that type's defaults (``Q4_0``, ``Q4_K_M``, ``Q8_0``, ``BF16``).

    llama.cpp's converter (``convert_hf_to_gguf.py``, not installed by the wheel) refuses
    this model's word-level tokenizer, so the FP32 GGUF it quantizes is written by adapter's
    GGUF writer (the same tensors and hyperparameters; ids in, ids out).
    """

    TYPES = {"q4_0": 2, "q4_k_m": 15, "q8_0": 7, "bf16": 32}

    def __init__(self, model: Path, out: Path, kind: str, threads: int) -> None:
        import ctypes

        import llama_cpp

        path = out / "model.gguf"
        if not path.is_file():
            out.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            lm = load_causal_lm(model)
            full = out / "f32.gguf"
            write_gguf(lm.model.float(), lm.family, layout_of(lm.model, lm.family), full)
            del lm
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = self.TYPES[kind], threads
            if llama_cpp.llama_model_quantize(str(full).encode(), str(path).encode(), ctypes.byref(params)) != 0:
                raise SystemExit(f"llama.cpp's quantizer failed for {kind}")
            full.unlink()
            self.convert_seconds = time.perf_counter() - started
        self.llama_cpp, self.path, self.threads = llama_cpp, path, threads
        self.llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)  # fmt: skip
        self.folder = out
        self.batches = {1}
        self.name = f"llama.cpp {kind.upper()}"

    def start(self, batch: int, capacity: int) -> None:
        """The DecoderSession protocol (whole sequences, batch 1), for adapter's own KL check."""
        if not hasattr(self, "scorer"):
            self.scorer = self.llama_cpp.Llama(str(self.path), n_ctx=1024, n_threads=self.threads, logits_all=True,
                                               verbose=False)  # fmt: skip
        self.scorer.reset()

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self.scorer.eval(ids[0].tolist())
        return np.asarray(self.scorer.scores[: ids.shape[1]], np.float32)[None]

    def run(self, prompts: list[list[int]], new: int) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompts[0])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        end = time.perf_counter()
        return (first - start) * 1e3, (new - 1) / (end - first)


class OpenVINOGenAI:
    """OpenVINO GenAI's ``LLMPipeline`` over optimum-intel's export (``--weight-format int4``:
    its INT4 default, asymmetric group 128 with some layers INT8; ``int8``), in a worker
    process (:mod:`_ov_genai_worker`) run by the Python of its own environment, because
    optimum-intel pins an older transformers than adapter's::

        python -m venv build/ovgenai-venv
        build/ovgenai-venv/bin/pip install torch==2.13.0 "optimum-intel[openvino]==2.2.0" \
            openvino-genai==2026.4.1.0 openvino==2026.4.1 nncf==3.4.0
        build/ovgenai-venv/bin/pip uninstall -y torchvision   # PyPI's does not import beside torch 2.13

    No KL row: the pipeline returns tokens, not logits.
    """

    def __init__(self, python: Path, model: Path, out: Path, weight_format: str, threads: int) -> None:
        if not (out / "openvino_model.xml").is_file():
            command = [str(python), "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model", str(model),
                       "--task", "text-generation-with-past", "--weight-format", weight_format, str(out)]  # fmt: skip
            self.convert_seconds = _convert(command, "optimum-intel's export")
        worker = Path(__file__).resolve().parent / "_ov_genai_worker.py"
        self.process = subprocess.Popen(
            [str(python), str(worker), str(out), str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        if "ready" not in json.loads(self.process.stdout.readline() or "{}"):
            raise SystemExit("OpenVINO GenAI's worker did not start (see its error above)")
        self.folder = out
        self.name = f"openvino-genai {weight_format}"

    def run(self, prompts: list[list[int]], new: int) -> tuple[float, float]:
        self.process.stdin.write(json.dumps({"prompts": prompts, "new": new}) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        return reply["ttft_ms"], reply["decode_tokens_per_s"]


def _disk_bytes(folder: Path) -> int:
    return sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in (".onnx", ".data", ".bin", ".gguf")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Hugging Face causal-LM folder")
    parser.add_argument("--make-tinyllama", type=Path, help="write the TinyLlama-shaped random model here and stop")
    parser.add_argument("--weights", default="fp32,int8,int4")
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument(
        "--pairs",
        default="",
        help="backend:weights pairs instead of every --backends x --weights (onnxruntime:int4,openvino:bf16)",
    )
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--kl-budget", type=float, default=0.05, help="for the reduced-weight engines")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--eager", default="fp32,bf16", help="transformers eager precisions ('' for none)")
    parser.add_argument("--ort-genai", default="int4,fp32", help="ONNX Runtime GenAI precisions ('' for none)")
    parser.add_argument(
        "--ctranslate2", default="int8,bfloat16", help="CTranslate2 compute types ('' for none; runs when installed)"
    )
    parser.add_argument("--ov-genai", default="int4,int8", help="OpenVINO GenAI weight formats ('' for none)")
    parser.add_argument(
        "--ov-genai-python",
        type=Path,
        default=Path("build/ovgenai-venv/bin/python"),
        help="Python of the environment with optimum-intel and openvino-genai (see OpenVINOGenAI)",
    )
    parser.add_argument(
        "--llama-cpp", default="q4_0,q8_0", help="llama.cpp quantization types ('' for none; runs when installed)"
    )
    parser.add_argument("--engines", type=Path, default=Path("build/llm-engines"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.make_tinyllama:
        make_tinyllama(args.make_tinyllama)
        print(f"wrote {args.make_tinyllama}")
        return 0
    if args.model is None:
        parser.error("--model or --make-tinyllama is required")
    torch.set_num_threads(args.threads)
    profile = load_profile("host")
    engines, sizes, converts, checks = [], {}, {}, {}
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",") if p] or [
        (b, w) for b in args.backends.split(",") for w in args.weights.split(",")
    ]
    for backend, weights in pairs:
        budget = "" if args.kl_budget == 0.05 else f"-kl{args.kl_budget:g}"
        out = args.engines / f"{args.model.name}-{backend}-{weights}{budget}"
        if not (out / "manifest.json").is_file():
            started = time.perf_counter()
            options = LLMOptions(
                backend=backend, weights=weights, threads=args.threads, kl_budget=args.kl_budget, benchmark=False
            )
            convert_causal_lm(str(args.model), out, options)
            converts[f"{backend} {weights}"] = time.perf_counter() - started
        name = f"adapter {backend} {weights}" + (f" (KL budget {args.kl_budget:g})" if budget else "")
        engines.append(Adapter(out, name))
        # bytes read per token: OpenVINO's BF16 engine is saved in FP32 and computes on BF16
        # copies; the others (llama.cpp's GGUF) hold what they read
        saved_fp32 = weights == "bf16" and engines[-1].engine.manifest["backend"]["name"] == "openvino"
        sizes[name] = _disk_bytes(out) // (2 if saved_fp32 else 1)
        checks[name] = engines[-1].engine.manifest["verification"]
    layout = next((e.engine.layout for e in engines if isinstance(e, Adapter)), None)

    def add_peer(peer, weight_bytes: int, kl: bool) -> None:
        """A peer's row: its engine, weight bytes, convert time and (reduced weights, where an
        adapter engine gives the layout) its next-token KL to FP32 eager by adapter's own check."""
        engines.append(peer)
        sizes[peer.name] = weight_bytes
        if kl and layout is not None:
            lm = load_causal_lm(args.model)
            checks[peer.name] = kl_against_eager(peer, lm.model.float(), layout, 16)
            del lm
        if hasattr(peer, "convert_seconds"):
            converts[peer.name] = peer.convert_seconds

    installed = importlib.util.find_spec("onnxruntime_genai") is not None
    for precision in [p for p in args.ort_genai.split(",") if p and installed]:
        peer = OrtGenAI(args.model, args.engines / f"{args.model.name}-ort-genai-{precision}", precision, args.threads)
        add_peer(peer, _disk_bytes(peer.folder), kl=precision != "fp32")
    if importlib.util.find_spec("ctranslate2") is not None:
        for compute in [c for c in args.ctranslate2.split(",") if c]:
            try:
                peer = CTranslate2(args.model, args.engines / f"{args.model.name}-ct2-{compute}", compute, args.threads)
            except ValueError as exc:  # a compute type its CPU build lacks (bfloat16 on its x86 wheels)
                print(f"ctranslate2 {compute}: no row ({exc})")
                continue
            add_peer(peer, _disk_bytes(peer.folder) // (2 if compute == "bfloat16" else 1), kl=True)
    if args.ov_genai and args.ov_genai_python.is_file():
        for weight_format in [w for w in args.ov_genai.split(",") if w]:
            out = args.engines / f"{args.model.name}-ov-genai-{weight_format}"
            add_peer(OpenVINOGenAI(args.ov_genai_python, args.model, out, weight_format, args.threads),
                     _disk_bytes(out), kl=False)  # fmt: skip
    if importlib.util.find_spec("llama_cpp") is not None:
        for kind in [k for k in args.llama_cpp.split(",") if k]:
            peer = LlamaCpp(args.model, args.engines / f"{args.model.name}-llama.cpp-{kind}", kind, args.threads)
            add_peer(peer, _disk_bytes(peer.folder), kl=True)
    for precision in [p for p in args.eager.split(",") if p]:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        model = load_causal_lm(args.model).model
        engines.append(Eager(model, dtype))
        sizes[engines[-1].name] = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    vocab = engines[0].engine.layout.vocab_size if isinstance(engines[0], Adapter) else 32000
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = _prompts(vocab, batch, args.prompt, round_)
            for engine in engines:
                if batch not in getattr(engine, "batches", {batch}):
                    continue  # llama-cpp-python's Llama API runs one sequence
                samples.setdefault((engine.name, batch), []).append(engine.run(prompts, args.new))
    bandwidth = profile.memory_bandwidth
    rows = []
    for (name, batch), runs in samples.items():
        ttft = statistics.median(r[0] for r in runs)
        tps = statistics.median(r[1] for r in runs)
        bound = bandwidth / sizes[name] if sizes.get(name) else None  # tokens/s per row at batch 1
        rows.append({
            "engine": name, "batch": batch, "ttft_ms": ttft, "decode_tokens_per_s": tps,
            "weight_bytes": sizes.get(name), "bandwidth_bound_tokens_per_s": bound,
            "fraction_of_bound": (tps / batch) / bound if bound else None,
            "kl_to_fp32": checks.get(name, {}).get("kl_mean"),
        })  # fmt: skip
    print(
        f"{'engine':34s} {'batch':>5s} {'TTFT ms':>9s} {'decode tok/s':>12s} {'weights GB':>10s} {'bound tok/s':>11s} {'of bound':>8s} {'KL':>8s}"
    )
    for row in rows:
        print(
            f"{row['engine']:34s} {row['batch']:5d} {row['ttft_ms']:9.1f} {row['decode_tokens_per_s']:12.2f} "
            f"{(row['weight_bytes'] or 0) / 1e9:10.2f} {row['bandwidth_bound_tokens_per_s'] or 0:11.1f} "
            f"{(row['fraction_of_bound'] or 0):8.0%} "
            + (f"{row['kl_to_fp32']:8.4f}" if row["kl_to_fp32"] is not None else f"{'-':>8s}")
        )
    missing = [
        pkg for pkg, module in PEER_PACKAGES.items()
        if importlib.util.find_spec(module) is None and not (pkg == "openvino-genai" and args.ov_genai_python.is_file())
    ]  # fmt: skip
    unwired = [pkg for pkg in PEER_PACKAGES if pkg not in missing and pkg not in WIRED]
    if missing:
        print(f"peers not installed here (no rows): {', '.join(missing)}")
    if unwired:
        print(f"peers installed but not wired into this script yet (no rows): {', '.join(unwired)}")
    result = {
        "model": str(args.model), "prompt": args.prompt, "new": args.new, "rounds": args.rounds,
        "threads": args.threads, "memory_bandwidth": bandwidth, "rows": rows, "convert_seconds": converts,
        "peers_not_installed": missing,
    }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
