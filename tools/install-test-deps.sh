#!/usr/bin/env bash
# Installs everything the test-suite uses on a fresh Debian bookworm machine, then the
# project itself with its test extras. Idempotent: packages already present are skipped.
#   - Debian: qemu-user + debootstrap (the emulated ARM64 machine for edge/TVM aarch64
#     artifacts), g++-aarch64-linux-gnu (TVM's aarch64 cross-compile), rocm-device-libs +
#     lld-19 + llvm (TVM's ROCm code objects and their checks), binutils (readelf).
#   - PyPI: the project with the [dev] extra (pytest, apache-tvm, cuobjdump, ...).
# nvcc is not installed here (no Debian package of the CUDA 13 toolkit): the CUDA tests
# use it when it is on PATH and say so when it is not.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(qemu-user debootstrap g++-aarch64-linux-gnu rocm-device-libs lld-19 llvm binutils chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: not root, cannot apt-get install ${missing[*]}; the tests that need them will say so." >&2
  else
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi
# llama-cpp-python compiles llama.cpp; its CMake default (GGML_NATIVE) turns on every ISA
# extension the compiler sees, AMX included, and on the AMX hosts seen here (KVM guests)
# ggml's AMX kernels stop the process with SIGILL at the first tile load. So the ISA list
# is given explicitly from this CPU's flags, AMX left out (CMAKE_ARGS set by you wins).
if [ -z "${CMAKE_ARGS:-}" ] && [ "$(uname -m)" = x86_64 ] && [ -r /proc/cpuinfo ]; then
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  isa=(-DGGML_NATIVE=OFF)
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512vbmi:AVX512_VBMI \
              avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    case "$flags" in *" ${pair%%:*} "*) isa+=("-DGGML_${pair#*:}=ON") ;; *) isa+=("-DGGML_${pair#*:}=OFF") ;; esac
  done
  export CMAKE_ARGS="${isa[*]}"
fi
pip install -q -e '.[dev]'
# The emulated arm64 machine's root filesystem (debootstrap, then numpy/onnxruntime/apache-tvm
# installed inside it under qemu), built once into adapter's cache: the edge and TVM aarch64
# tests run artifacts in it. A failure here is not fatal: those tests build it or say why.
if [ "$(id -u)" -eq 0 ] && command -v qemu-aarch64 >/dev/null && command -v debootstrap >/dev/null; then
  python -c "from adapter.backends._arm64 import ensure_rootfs; ensure_rootfs(say=lambda m: None)" \
    || echo "install-test-deps: the arm64 root filesystem did not build; the arm64 tests will retry and say why." >&2
fi
