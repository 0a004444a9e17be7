#!/usr/bin/env bash
# Run on the CPU box (repo root) before a GPU session: the wheels bench/GPU_RUNBOOK.md's calls carry to the
# GPU host, which reaches no package index. Idempotent (a folder already made is kept); the folders are
# git-ignored, so they travel only as a call's `carry`, and a new checkout (or machine) needs this again.
#   .whl_gpu/    PyAV for Python 3.12 (+ DALI's small dependencies, for Plan B)      ~40 MB
#   .whl_fa4/    FlashAttention-4 and the CuTe DSL (all but the largest wheel)
#   .fa4_parts/  the CuTe DSL's CUDA 13 library wheel in two pieces under the 64 MiB a call carries
#   .dali_parts/ nvidia-dali-cuda130 in 50 MB pieces (Plan B only: `bash bench/prepare_gpu_wheels.sh dali`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
get() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 "$@"; }
if [ ! -d .whl_gpu ]; then
  get -d .whl_gpu.tmp av astunparse gast makefun nvtx optree libcst && mv .whl_gpu.tmp .whl_gpu
fi
if [ ! -d .fa4_parts ]; then
  rm -rf .whl_fa4.tmp && get -d .whl_fa4.tmp flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
    nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
    'cuda-bindings>=13.0,<13.1' cuda-pathfinder 'apache-tvm-ffi>=0.1.11,<0.2' 'quack-kernels>=0.5.3' einops protobuf
  big=$(ls .whl_fa4.tmp/nvidia_cutlass_dsl_libs_cu13-*.whl)
  mkdir -p .fa4_parts.tmp && split -b 55M "$big" .fa4_parts.tmp/cutlass_cu13.whl.part. && rm "$big"
  # 1b joins exactly part.aa and part.ab: more pieces would need the runbook changed
  [ "$(ls .fa4_parts.tmp | wc -l)" = 2 ] || { echo "the CuTe DSL cu13 wheel no longer fits two pieces" >&2; exit 1; }
  rm -rf .whl_fa4 && mv .whl_fa4.tmp .whl_fa4 && mv .fa4_parts.tmp .fa4_parts
fi
if [ "${1:-}" = dali ] && [ ! -d .dali_parts ]; then
  get -d /tmp/dali_wheel nvidia-dali-cuda130==2.4.0
  mkdir -p .dali_parts.tmp && split -b 50M /tmp/dali_wheel/nvidia_dali_*.whl .dali_parts.tmp/dali.whl.part. \
    && mv .dali_parts.tmp .dali_parts && rm -rf /tmp/dali_wheel
fi
# What each call carries must stay under 64 MiB with the working tree (~2 MB).
du -sh .whl_gpu .whl_fa4 .fa4_parts/* ${1:+.dali_parts} 2>/dev/null
