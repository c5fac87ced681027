#!/usr/bin/env bash
# Compile-check csrc/cuda_kernels.cu (device kernels and ATen launchers) with nvcc for sm_80 and sm_90,
# and csrc/bindings.cpp with DZ_WITH_CUDA (the CUDA registrations of the operators) with the host
# compiler. Needs nvcc and an importable torch (a CPU-only wheel is enough: no GPU, no CUDA torch).
# Writes the objects to $OUT_DIR (default: a temporary directory). Usage: csrc/compile_check_cuda.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
PY="${PYTHON:-python}"
[ -x "$NVCC" ] || { echo "compile_check_cuda: nvcc not found (set NVCC)" >&2; exit 2; }
mapfile -t incs < <("$PY" -c 'from torch.utils.cpp_extension import include_paths
for p in include_paths(): print(p)')
flags=()
for p in "${incs[@]}"; do flags+=("-I$p"); done
# CPU-only torch wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h: use the stand-in.
[ -f "${incs[0]}/c10/cuda/impl/cuda_cmake_macros.h" ] || flags+=("-I$here/compat")
out="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$out"
# The flags torch's CUDAExtension passes to nvcc, and the two architectures of the build.
"$NVCC" -c "$here/cuda_kernels.cu" -o "$out/cuda_kernels.o" -I"$here" "${flags[@]}" \
  -DDZ_WITH_CUDA -std=c++20 -O3 --expt-relaxed-constexpr -Xcompiler -fPIC \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ -diag-suppress 20013,20015 \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
# The operator registrations of a CUDA build (TORCH_LIBRARY_IMPL(deepzero, CUDA, ...)), as setup.py compiles them.
pyinc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
"${CXX:-c++}" -c "$here/bindings.cpp" -o "$out/bindings_cuda.o" -I"$here" "${flags[@]}" -I"$pyinc" \
  -DDZ_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_native -std=c++20 -O1 -fPIC
echo "compile_check_cuda: OK ($("$NVCC" --version | tail -1); sm_80, sm_90; bindings with DZ_WITH_CUDA) -> $out"
