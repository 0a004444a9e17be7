#!/usr/bin/env bash
# One batched GPU session (the device tool's budget is small): GPU tests, kernel and ingestion benchmarks.
# Usage on a GPU host from the repo root: OUT=results bash bench/gpu_checks.sh [tests|graphtests|kernels|sweep|extract|extract_pyav|extract_e2e|pretrain|train|graphs|overlap|profile|profile16|fa4|autotune]...
# Wheels for packages the host lacks (DALI, PyAV) may be pre-installed into /tmp/site (PYTHONPATH); FlashAttention-4
# and its CuTe DSL into /tmp/fa4site (the fa4 part adds it; bench/GPU_RUNBOOK.md says how they travel).
# Inner timeouts keep each runbook call under the device tool's 600 s: graphtests+graphs 140+200+110+110.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:${PWD}${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# NVDEC and SM utilisation once a second into $OUT/$1 while a command runs (the extract stages print the
# time they end): tells saturated decode engines from ones waiting on the CPU.
with_gpu_log() { local log=$1; shift
  nvidia-smi --query-gpu=timestamp,utilization.decoder,utilization.gpu --format=csv,noheader -lms 1000 > "$OUT/$log" 2>/dev/null &
  local sampler=$!; "$@"; local rc=$?; kill $sampler 2>/dev/null; return $rc; }
for part in "${@:-tests kernels extract pretrain}"; do
  for p in $part; do
    case $p in
      tests)    # -v into a file: a run cut by the timeout still names every test it finished, pass or fail
                timeout 420 python3 -m pytest -v -rfE --durations=10 -m gpu tests -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 ;
                grep -cE ' PASSED' "$OUT/gpu_tests.log" ; grep -E ' (FAILED|ERROR)' "$OUT/gpu_tests.log" | head -20 ; tail -25 "$OUT/gpu_tests.log" ;;
      graphtests) timeout 140 python3 -m pytest -q -m gpu tests/test_graphs.py tests/test_train.py -p no:cacheprovider \
                  2>&1 | tail -25 | tee "$OUT/gpu_graph_tests.log" ;;
      kernels)  timeout 200 python3 bench/kernels.py --no-compile --json "$OUT/kernels.json" 2>&1 | grep -v '^{' | tail -96 ;;  # 6 cases x 13 rows + header: 80 lines
      sweep)    # similarity-kernel launch configs (issue 4): ~190 configs x 3 shapes, then semantic_mask best vs default;
                # stops timing at its own 150 s budget; kernels_sweep.json is rewritten after every shape
                timeout 180 python3 bench/kernels.py --sweep-sim --json "$OUT/kernels_sweep.json" 2>&1 | tail -120 ;;
      extract)  timeout 420 python3 bench/extract.py --video-dir "${VIDEO_DIR:-/tmp/bench_videos}" --videos "${VIDEOS:-4}" --readers "${READERS:-4}" \
                  --decode-workers "${DECODE_WORKERS:-0}" --copies "${COPIES:-16}" --json "$OUT/extract.json" 2>&1 | tail -36 ;;
      extract_pyav) # issue 5 without DALI (one call, carry .whl_gpu): PyAV decodes, several videos/parts at once
                python3 -c 'import av' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
                  --no-cache-dir --target /tmp/site .whl_gpu/av-*.whl ;
                with_gpu_log nvsmi_extract_pyav.csv timeout 420 python3 bench/extract.py --video-dir "${VIDEO_DIR:-/tmp/bench_videos}" \
                  --videos "${VIDEOS:-4}" --decode-workers "${DECODE_WORKERS:-0}" --nvdec-workers "${NVDEC_WORKERS:-0}" \
                  --copies "${COPIES:-8}" --json "$OUT/extract_pyav.json" 2>&1 | tail -37 ;;
      extract_e2e) # issue 5, a second look: the end-to-end rows only (pyav, hybrid, nvdec), on the videos an
                # earlier extract_pyav call left in /tmp/bench_videos (written again if the machine was released)
                python3 -c 'import av' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
                  --no-cache-dir --target /tmp/site .whl_gpu/av-*.whl ;
                # NVDEC's prerequisites: the driver's decode library (containers get it only with the "video"
                # driver capability) and the check extract runs (FFmpeg's own words when it falls back)
                echo "[bench] NVIDIA_DRIVER_CAPABILITIES=${NVIDIA_DRIVER_CAPABILITIES:-unset};" \
                  "libnvcuvid: $( (ldconfig -p 2>/dev/null | grep -o 'libnvcuvid[^ ]*' | sort -u | tr '\n' ' ') || true)" | tee -a "$OUT/gpu.txt" ;
                python3 -c 'from lvmae_fast.video.decode_pyav import nvdec_problem as p; print("[bench] NVDEC check:", p(0) or "NVDEC decoded the test clip")' 2>&1 | tail -2 | tee -a "$OUT/gpu.txt" ;
                # VARIANTS="k=v,k=v;k=v;base": bench/extract.py --variant passes, the same rows again in this process
                vargs=(); IFS=';' read -ra vlist <<< "${VARIANTS:-}"; for v in "${vlist[@]}"; do vargs+=(--variant "$v"); done
                tag="cpu${DECODE_WORKERS:-0}_nvdec${NVDEC_WORKERS:-0}_${GOP_TAILS:-skip}_t${FRAME_THREADS:-0}_${NVDEC_CONTEXT:-own}_nice${CPU_NICE:-0}_side${SIDE_STREAMS:-0}${VARIANTS:+_variants$(printf %s "$VARIANTS" | md5sum | cut -c1-6)}"
                with_gpu_log "nvsmi_e2e_$tag.csv" \
                  timeout "${E2E_TIMEOUT:-300}" python3 bench/extract.py --video-dir "${VIDEO_DIR:-/tmp/bench_videos}" --videos "${VIDEOS:-4}" \
                  --decode-workers "${DECODE_WORKERS:-0}" --nvdec-workers "${NVDEC_WORKERS:-0}" --copies "${COPIES:-8}" \
                  --only "${ONLY:-end_to_end_pyav,end_to_end_hybrid,end_to_end_nvdec,decode_nvdec}" --gop-tails "${GOP_TAILS:-skip}" \
                  --frame-threads "${FRAME_THREADS:-0}" --nvdec-context "${NVDEC_CONTEXT:-own}" --cpu-decode-nice "${CPU_NICE:-0}" \
                  $([ "${SIDE_STREAMS:-0}" = 1 ] && echo --side-streams) ${vargs[@]+"${vargs[@]}"} \
                  --json "$OUT/extract_e2e_$tag.json" 2>&1 \
                  | grep -E '^\| (end to end|decode, PyAV on NVDEC|variant|CPU cores)|rror|\[bench\]' ;;
      pretrain) timeout 200 python3 bench/pretrain.py --preset paper --batch-sizes 16,64,256 --steps 15 --warmup 5 \
                  --json "$OUT/pretrain.json" 2>&1 | grep '^|' ;
                timeout 240 python3 bench/pretrain.py --preset paper --batch-sizes 16,256 --steps 15 --warmup 5 \
                  --skip-padded --long-len 0 --compile --json "$OUT/pretrain_compile.json" 2>&1 | grep '^|' ;;
      train)    timeout 150 python3 bench/pretrain.py --mode data --preset paper --device cuda --dim 1024 --videos 512 \
                  --steps 40 --warmup 5 --num-workers 4 --json-out "$OUT/pretrain_data.json" 2>&1 | grep -E '^\||rate|error' ;
                timeout 150 python3 -m lvmae_fast demo --source embeddings --out /tmp/gpu_demo --overwrite --no-progress \
                  --epochs 20 2>&1 | grep -E 'device|\[|error|Error' ;;
      graphs)   # (the graph GPU tests are in the tests part) batch 16 (the 10x target): eager, forward/backward graphs, whole-step graphs (update captured)
                timeout 200 python3 bench/pretrain.py --preset paper --batch-sizes 16 --steps 20 --warmup 5 \
                  --long-len 0 --cuda-graphs --graph-optimizer --master-weights --compile --json "$OUT/pretrain_graphs.json" 2>&1 | grep -E '^\||rror|recompile_limit|\[bench\]' ; echo "[bench] exit ${PIPESTATUS[0]} (124: cut by its timeout)" ;
                for mode in graphs eager; do  # graphs: every timed shape is captured before the clock
                  flags=(); [ "$mode" = graphs ] && flags=(--cuda-graphs --graph-optimizer)
                  timeout 110 python3 bench/pretrain.py --mode data --preset paper --device cuda --dim 1024 --videos 512 \
                    --steps 100 --warmup 10 --num-workers 4 "${flags[@]}" --json-out "$OUT/pretrain_data_$mode.json" \
                    2>&1 | grep -E '^\||rror|captur' ; done ;;
      overlap)  # issue 2: batch 16 with the AdamW update on a second stream during backward (row +overlap) beside
                # whole-step graphs (row +opt) and the padded baseline, in one run; then its GPU test (captured vs eager)
                timeout 240 python3 bench/pretrain.py --preset paper --batch-sizes 16 --steps 20 --warmup 5 --long-len 0 \
                  --cuda-graphs --graph-optimizer --overlap-update --overlap-chunks 32,8 --compile --json "$OUT/pretrain_overlap.json" 2>&1 | grep -E '^\||rror|recompile_limit|\[bench\]' ; echo "[bench] exit ${PIPESTATUS[0]} (124: cut by its timeout)" ;
                timeout 150 python3 -m pytest -q -m gpu tests/test_graphs.py -k whole_step_graphs_update -p no:cacheprovider \
                  2>&1 | tail -15 | tee "$OUT/gpu_overlap_tests.log" ;;
      fa4)      # issue 2: FlashAttention-4 (attn_impl=fa4, its Hopper kernels) beside torch's FlashAttention-2 varlen
                # kernels: its GPU tests (forward and gradients vs the naive attention), then batch 256 compiled (the
                # 400 TFLOP/s target) and batch 16 in its fastest form, each with an 'attn=fa4' row in the same run
                export PYTHONPATH="/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH" ;
                python3 -c 'from lvmae_fast.attention import _fa4_varlen as f; import sys; sys.exit(f() is None)' \
                  && echo "[bench] FA4 (flash_attn.cute) imports" \
                  || python3 -c 'from flash_attn.cute import flash_attn_varlen_func' 2>&1 | tail -5 ;
                timeout 120 python3 -m pytest -q -m gpu tests/test_attention.py -p no:cacheprovider 2>&1 | tail -15 \
                  | tee "$OUT/gpu_fa4_tests.log" ;
                timeout 200 python3 bench/pretrain.py --preset paper --batch-sizes 256 --steps 10 --warmup 3 --skip-padded \
                  --long-len 0 --compile --compare-attn fa4 --json "$OUT/pretrain_fa4_b256.json" 2>&1 | grep -E '^\||rror|recompile_limit|\[bench\]' ; echo "[bench] exit ${PIPESTATUS[0]} (124: cut by its timeout)" ;
                timeout 200 python3 bench/pretrain.py --preset paper --batch-sizes 16 --steps 20 --warmup 5 --skip-padded \
                  --long-len 0 --cuda-graphs --graph-optimizer --overlap-update --compile --compare-attn fa4 \
                  --json "$OUT/pretrain_fa4_b16.json" 2>&1 | grep -E '^\||rror|recompile_limit|\[bench\]' ; echo "[bench] exit ${PIPESTATUS[0]} (124: cut by its timeout)" ;;
      autotune) # issue 2: the blocks compiled with inductor's max-autotune (GEMMs as Triton templates where they
                # time faster, so GELU can run in the fc1 GEMM's epilogue: GELU forward+backward were 8% of the b256
                # step, unfused) beside the default compile, same run: batch 256 (the 400 TFLOP/s target), then 16
                export ENABLE_PERSISTENT_TMA_MATMUL=1 ;  # Hopper's TMA persistent GEMM templates among the choices
                timeout 330 python3 bench/pretrain.py --preset paper --batch-sizes 256 --steps 10 --warmup 3 --skip-padded \
                  --long-len 0 --compile --compare-compile-modes max-autotune-no-cudagraphs \
                  --json "$OUT/pretrain_autotune_b256.json" 2>&1 | grep -E '^\||rror|recompile_limit|\[bench\]' ; echo "[bench] exit ${PIPESTATUS[0]} (124: cut by its timeout)" ;
                timeout 240 python3 bench/pretrain.py --preset paper --batch-sizes 16 --steps 20 --warmup 5 --skip-padded \
                  --long-len 0 --cuda-graphs --graph-optimizer --overlap-update --compile \
                  --compare-compile-modes max-autotune-no-cudagraphs --json "$OUT/pretrain_autotune_b16.json" 2>&1 \
                  | grep -E '^\||rror|recompile_limit|\[bench\]' ; echo "[bench] exit ${PIPESTATUS[0]} (124: cut by its timeout)" ;;
      profile16) # issue 2, batch 16: where the overlapped step and the MasterWeightAdamW step spend GPU time (their rows
                # were never profiled: MasterWeightAdamW removes ~1.6 ms of weight/gradient casts per step on paper but
                # gained 0.2 ms; --profile takes the last mode asked for since 2026-11-27)
                for extra in --overlap-update --master-weights; do
                  timeout 120 python3 bench/pretrain.py --preset paper --batch-sizes 16 --steps 3 --warmup 2 --skip-padded \
                    --long-len 0 --cuda-graphs --graph-optimizer --compile "$extra" --profile "$OUT/profile_b16_${extra#--}.txt" \
                    2>&1 | grep -E '^\||rror|recompile_limit|\[bench\]' ; echo "[bench] exit ${PIPESTATUS[0]} (124: cut by its timeout)" ; head -25 "$OUT/profile_b16_${extra#--}.txt" | cut -c1-57,128-200 ; done ;;
      profile)  # where a compute-bound batch-256 step (compiled: its fastest, 369 TFLOP/s vs the 400 target) and a
                # launch-bound batch-16 step spend GPU time
                timeout 200 python3 bench/pretrain.py --preset paper --batch-sizes 256 --steps 3 --warmup 2 \
                  --skip-padded --long-len 0 --compile --profile "$OUT/profile_b256.txt" 2>&1 | grep -E '^\||rror|recompile_limit|\[bench\]' ; echo "[bench] exit ${PIPESTATUS[0]} (124: cut by its timeout)" ;
                timeout 200 python3 bench/pretrain.py --preset paper --batch-sizes 16 --steps 3 --warmup 2 \
                  --skip-padded --long-len 0 --cuda-graphs --graph-optimizer --compile \
                  --profile "$OUT/profile_b16.txt" 2>&1 | grep -E '^\||rror|recompile_limit|\[bench\]' ; echo "[bench] exit ${PIPESTATUS[0]} (124: cut by its timeout)" ;  # the fastest b16 step: what is left in it
                head -30 "$OUT/profile_b256.txt" ;;
      *) echo "unknown part $p" >&2 ;;
    esac
  done
done
