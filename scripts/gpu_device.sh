#!/usr/bin/env bash
# Packs, and on the GPU machine sets up, what scripts/gpu_check.py needs to run there without
# apache-tvm (whose 100 MB wheel is too large to carry): the tvm_ffi wheel for the GPU machine's
# Python, TVM's runtime libraries from the installed apache-tvm (libtvm_runtime.so and the CUDA
# plugin libtvm_runtime_cuda.so) and the CUDA 13 runtime they link (libcudart.so.13).
set -euo pipefail

usage() {
  cat <<EOF
Usage: scripts/gpu_device.sh pack DIR [--arch sm_90] [--variants N] [--python 3.12]
         (here) build the kernels into DIR/kernels (gpu_check.py prepare) and put the runtime
         files in DIR/lib and DIR/whl.
       scripts/gpu_device.sh run DIR OUT
         (on the GPU machine, from the repository root) install the carried wheel in a scratch
         folder and run 'gpu_check.py run DIR/kernels --out OUT'.
EOF
}

pack() {
  local dir=$1; shift
  local arch=sm_90 variants=32 python=3.12
  while [[ $# -gt 0 ]]; do
    case $1 in
      --arch) arch=$2; shift 2 ;;
      --variants) variants=$2; shift 2 ;;
      --python) python=$2; shift 2 ;;
      *) usage >&2; exit 2 ;;
    esac
  done
  local py=${PYTHON:-.venv/bin/python}
  mkdir -p "$dir/lib" "$dir/whl"
  local tvm_lib ffi_version cudart
  tvm_lib=$("$py" -c 'import os, tvm; print(os.path.join(os.path.dirname(tvm.__file__), "lib"))')
  ffi_version=$("$py" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')
  cp "$tvm_lib/libtvm_runtime.so" "$tvm_lib/libtvm_runtime_cuda.so" "$dir/lib/"
  cudart=$(ldd "$tvm_lib/libtvm_runtime_cuda.so" | awk '/libcudart/ {print $3}')
  [[ -f $cudart ]] || { echo "libcudart.so.13 not found (install the CUDA 13 toolkit)" >&2; exit 1; }
  cp "$cudart" "$dir/lib/"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$dir/whl" "apache-tvm-ffi==$ffi_version"
  "$py" scripts/gpu_check.py prepare "$dir/kernels" --arch "$arch" --variants "$variants"
  du -sh "$dir"
}

run() {
  local dir=$1 out=$2 site=/tmp/tvmconv-gpu-site
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$dir"/whl/*.whl
  export PYTHONPATH=$site:$PWD TVMCONV_TVM_RUNTIME=$PWD/$dir/lib/libtvm_runtime.so
  export LD_LIBRARY_PATH=$PWD/$dir/lib:${LD_LIBRARY_PATH:-}
  python3 scripts/gpu_check.py run "$dir/kernels" --out "$out"
}

case ${1:-} in
  pack) shift; [[ $# -ge 1 ]] || { usage >&2; exit 2; }; pack "$@" ;;
  run) shift; [[ $# -eq 2 ]] || { usage >&2; exit 2; }; run "$@" ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
