#!/usr/bin/env bash
# The GPU machine's part of tvmconv's CUDA work, in one prepared call: the checks and cuDNN comparisons of
# scripts/gpu_check.py and the timing of a round of tuning candidates (tvmconv.rounds, `python -m
# tvmconv.timing`), with TVM's runtime alone. apache-tvm's 100 MB wheel is too large to carry there, so this
# packs the tvm_ffi wheel for the GPU machine's Python, TVM's runtime libraries from the installed apache-tvm
# (libtvm_runtime.so and the CUDA plugin libtvm_runtime_cuda.so) and the CUDA 13 runtime they link
# (libcudart.so.13).
set -euo pipefail

usage() {
  cat <<EOF
Usage: scripts/gpu_device.sh pack DIR [--arch sm_90] [--variants N] [--python 3.12]
                                      [--round-trials N] [--round-size N]
         (here) build the check and benchmark kernels into DIR/kernels (gpu_check.py prepare), put the
         runtime files in DIR/lib and DIR/whl, and with --round-trials write a round of tuning candidates
         for ResNet-50 and MobileNetV2 at batch 1 into DIR/round (tvmconv tune ... --runner batch:DIR/round;
         records and the cost model go to the log dir, \$TVMCONV_TUNING_LOGS).
       scripts/gpu_device.sh run DIR OUT
         (on the GPU machine, from the repository root) install the carried wheel in a scratch folder, run
         'gpu_check.py run DIR/kernels --out OUT', then time DIR/round if there is one (at most
         \$ROUND_SECONDS, default 150 s) and copy its results to OUT/round-results.json. Exit status 1 if a
         check failed.
       scripts/gpu_device.sh ingest DIR OUT
         (here) put OUT/round-results.json into DIR/round and ingest it: records, cost model, next round.
EOF
}

pack() {
  local dir=$1; shift
  local arch=sm_90 variants=0 python=3.12 round_trials=0 round_size=256
  while [[ $# -gt 0 ]]; do
    case $1 in
      --arch) arch=$2; shift 2 ;;
      --variants) variants=$2; shift 2 ;;
      --python) python=$2; shift 2 ;;
      --round-trials) round_trials=$2; shift 2 ;;
      --round-size) round_size=$2; shift 2 ;;
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
  if [[ $round_trials -gt 0 ]]; then
    "$py" -m tvmconv.cli tune resnet50 mobilenet_v2 --target "cuda-$arch" --trials "$round_trials" \
      --round-size "$round_size" --runner "batch:$dir/round"
  fi
  du -sh "$dir"
}

run() {
  local dir=$1 out=$2 site=/tmp/tvmconv-gpu-site status=0
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$dir"/whl/*.whl
  export PYTHONPATH=$site:$PWD TVMCONV_TVM_RUNTIME=$PWD/$dir/lib/libtvm_runtime.so
  export LD_LIBRARY_PATH=$PWD/$dir/lib:${LD_LIBRARY_PATH:-}
  mkdir -p "$out"
  python3 scripts/gpu_check.py run "$dir/kernels" --out "$out" || status=$?
  if [[ -f $dir/round/round.json ]]; then
    python3 -m tvmconv.timing "$dir/round" --seconds "${ROUND_SECONDS:-150}"
    cp "$dir/round/results.json" "$out/round-results.json"
  fi
  return $status
}

ingest() {
  local dir=$1 out=$2
  cp "$out/round-results.json" "$dir/round/results.json"
  "${PYTHON:-.venv/bin/python}" -m tvmconv.cli tune --ingest "$dir/round"
}

case ${1:-} in
  pack) shift; [[ $# -ge 1 ]] || { usage >&2; exit 2; }; pack "$@" ;;
  run) shift; [[ $# -eq 2 ]] || { usage >&2; exit 2; }; run "$@" ;;
  ingest) shift; [[ $# -eq 2 ]] || { usage >&2; exit 2; }; ingest "$@" ;;
  -h|--help) usage ;;
  *) usage >&2; exit 2 ;;
esac
