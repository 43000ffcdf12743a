#!/usr/bin/env bash
# Compile the pure-CUDA sources in csrc/ (no torch headers) for Hopper (sm_90a) and Ampere (sm_80)
# with this machine's nvcc, so that a syntax or type error fails CI without a GPU.
# Usage: .ci/compile_cuda.sh  (from anywhere; NVCC overrides the compiler)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found (set NVCC or put the CUDA toolkit's bin on PATH)" >&2
  exit 1
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
sources=(csrc/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_cuda: no .cu sources in csrc/" >&2
  exit 1
fi
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  echo "compile_cuda: $src"
  "$NVCC" -std=c++17 -O3 -c "$src" -o "$out/$name.o" \
    -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=sm_80 \
    --Werror all-warnings -Xcompiler -Wall,-Wextra
done
echo "compile_cuda: OK (${#sources[@]} file(s), sm_90a + sm_80)"
