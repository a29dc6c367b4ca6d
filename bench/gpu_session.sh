#!/usr/bin/env bash
# One call per stage on a lent GPU (the `device` tool: 10 minutes a call, 30 minutes a session).
# Builds the extension, proves the kernels on the GPU, then measures them with the anchors in the
# same run. Everything worth keeping is written under $OUT (default: bench/gpu_out).
#
#   bash bench/gpu_session.sh first       # THE first call (< 7 min): build (timed), a canary (each attention
#                                         #   path once, alone, time-limited: bench/gpu_canary.py), the randomized sweep
#                                         #   (bench/gpu_sweep.py, 90 s), the ANCHORS.md bf16 rows beside SDPA
#                                         #   flash/cuDNN, F.layer_norm, torch.softmax, Liger; ratio table last
#   bash bench/gpu_session.sh second      # (< 7 min) DecoderLM step vs PyTorch eager/compiled, then the
#                                         #   Shakespeare GPU recipe cut at 3 minutes (run.time_limit_s)
#   GPU_SESSION_DRY_RUN=1 PY=/path/to/venv/python bash bench/gpu_session.sh first   # CPU rehearsal:
#                                         #   GPU parts skipped with a message, the sweep on the CPU for 5 s
#   bash bench/gpu_session.sh tests       # build + GPU correctness: kernel tests, cuda extension, ctest
#     (= tests-rows then tests-attention: one call each when the build and both do not fit 10 minutes)
#   bash bench/gpu_session.sh sanitize    # compute-sanitizer memcheck, racecheck, synccheck over the CUDA kernels
#   bash bench/gpu_session.sh kernels     # ANCHORS.md rows, bf16: attention, LayerNorm, softmax + report
#     (= kernels-attention + kernels-rows, one call each if together they pass 10 minutes)
#   bash bench/gpu_session.sh sweep       # attention sequence-length sweep 512..16k, fp16 rows
#   bash bench/gpu_session.sh train-step  # DecoderLM training step vs plain PyTorch (eager, compiled)
#   bash bench/gpu_session.sh hf          # HF Llama-style training step, attn_implementation tformer vs sdpa
#   PROFILE="--shape 4,16,4096,128 --causal --backend triton --pass bwd" bash bench/gpu_session.sh profile
#                                         # Nsight Compute (full set) on one attention row: the worst one
#   bash bench/gpu_session.sh shakespeare # the GPU recipe: val loss <= 1.40 within 3 minutes?
#     (SHAKESPEARE_CONFIG=shakespeare_gpu_large.json: the second candidate, 8 layers, d 512, dropout 0.3)
#   IMDB=device_carry/aclImdb_labeled.tar.gz bash bench/gpu_session.sh imdb-pretrain  # stage 1: MLM, ~6 min
#   IMDB=... IMDB_MLM=device_carry/imdb_mlm bash bench/gpu_session.sh imdb-finetune   # stage 2: >= 90% test?
#   IMDB=... bash bench/gpu_session.sh imdb          # both stages in one call (a machine without the 10-minute cap)
#   IMDB=... bash bench/gpu_session.sh imdb-scratch  # the same classifier from scratch (configs/imdb_scratch.json)
#     (copy the archive into the git-ignored device_carry/ and name it in the call's `carry`; the 10-minute
#     target counts both stages' wall times, printed at the end of each. Between two calls, copy the
#     pretraining stage's $OUT/imdb_mlm (its export, a few tens of MB) and $OUT/imdb_cache (the BPE) back
#     into device_carry/ and carry them; IMDB_MLM and IMDB_CACHE name them.)
#
# Stages can be chained: `bash bench/gpu_session.sh tests kernels`. Back here, the kernels* JSONs
# set backend="auto"'s per-shape order: `python -m bench.report FETCHED/kernels_attention.json
# --auto-table tformer/ops/measured_auto.json` (then kernels_rows.json; entries merge by op).
# Before the session, `bash bench/prepare_device_carry.sh` here fills device_carry/ (Liger-Kernel's
# wheel, the LayerNorm anchor the image lacks, and the IMDb archive); carry device_carry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" WANDB_MODE=disabled
PY="${PY:-python3}"
DRY="${GPU_SESSION_DRY_RUN:-}"  # non-empty: rehearse on a machine without a GPU
# Triton's compiled kernels and autotune results in the git-ignored build/: kept between the
# calls of one session on the same warm machine, so later stages do not compile again.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/build/triton-cache}"
status=0

# Wheels carried in device_carry/wheels (bench/prepare_device_carry.sh) go to /tmp/site.
if ls device_carry/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    device_carry/wheels/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

build() {
  if [ -n "$DRY" ]; then echo "dry run: no GPU here, the CUDA extension build is skipped"; return; fi
  [ -n "$(ls tformer/_C*.so 2>/dev/null)" ] && return
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
  BUILD_START=$SECONDS
  TFORMER_BUILD_CUDA=1 timeout "${BUILD_TIMEOUT:-240}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 5
  echo "build: CUDA extension wall time $((SECONDS - BUILD_START)) s (MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" \
    | tee -a "$OUT/device.txt"
}

bench() {  # bench NAME PATHS-AND-PYTEST-ARGS... (name the files: "bench" is every benchmark)
  # BENCH_TIMEOUT: SIGINT ends pytest's session cleanly, so the JSON of the rows done is still written.
  local name=$1; shift
  timeout -s INT -k 30 "${BENCH_TIMEOUT:-540}" "$PY" -m pytest --benchmark-only -q --benchmark-json "$OUT/$name.json" "$@" 2>&1 | tail -n 30 || status=1
  "$PY" -m bench.report "$OUT/$name.json" --out-dir "$OUT/$name" ${BENCH_REPORT_ARGS:-} || status=1  # prints report.md
}

run_tests() {  # run_tests rows|attention: one group of the GPU correctness tests (+ ctest with the rows)
  local files
  case "$1" in
    rows) files="tests/test_layer_norm.py tests/test_softmax.py tests/test_cuda_extension.py tests/test_registry.py tests/test_nn.py" ;;
    attention) files="tests/test_attention.py tests/test_attention_hopper.py tests/test_cuda_attention_extension.py tests/test_cuda_attention_sm90.py tests/test_cuda_attention_band.py" ;;
  esac
  # Autotuning off: each kernel variant compiles once, not three times (the benchmarks tune).
  # --maxfail, not -x: one call should show every failing kernel, not the first.
  TFORMER_AUTOTUNE=0 timeout 540 "$PY" -m pytest -q -rs --maxfail=15 $files 2>&1 | tee "$OUT/tests-$1.log" \
    | tail -n 30 || status=1
  if [ "$1" = rows ]; then
    (cmake -B build-cmake -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null && cmake --build build-cmake -j16 >/dev/null \
      && ctest --test-dir build-cmake --output-on-failure) 2>&1 | tail -n 15 || status=1
  fi
}

imdb_train() {  # imdb_train NAME CONFIG ARGS...: one tformer/train.py run on IMDb, its wall time printed
  local name=$1 config=$2; shift 2
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  timeout 590 "$PY" tformer/train.py --config "$config" --set data.path="${IMDB:?set IMDB to the archive}" \
    --set data.cache_dir="${IMDB_CACHE:-$OUT/imdb_cache}" --set logging.wandb=false "$@" 2>&1 \
    | tr '\r' '\n' | grep -v "step/s" | tail -n 40
  local rc=${PIPESTATUS[0]}
  echo "imdb $name: wall time $((SECONDS - start)) s (exit $rc)" | tee -a "$OUT/imdb_wall_times.txt"
  return "$rc"
}

imdb_pretrain() {
  # The run lives outside $OUT (its checkpoints hold the optimizer too); only the export comes back:
  # the final one, or the latest checkpoint's when the stage was cut short.
  rm -rf runs/imdb_mlm_stage
  imdb_train pretrain imdb_mlm.json --set run.out_dir=runs/imdb_mlm_stage
  local rc=$? export_dir=runs/imdb_mlm_stage/export
  [ -f "$export_dir/model.safetensors" ] || export_dir=$(ls -d runs/imdb_mlm_stage/checkpoints/step_*/export 2>/dev/null | tail -n 1)
  if [ -n "$export_dir" ]; then
    mkdir -p "$OUT/imdb_mlm" && cp -r "$export_dir" "$OUT/imdb_mlm/export"
    cp runs/imdb_mlm_stage/metrics.jsonl "$OUT/imdb_mlm/" 2>/dev/null
  fi
  return "$rc"
}

imdb_finetune() {
  imdb_train finetune imdb.json --set training.init_from="${IMDB_MLM:-$OUT/imdb_mlm}" --set run.out_dir="$OUT/imdb"
}

first_stage() {  # the first call of a GPU session: build, canary, sweep, anchors; about 6.5 minutes at most
  local start=$STAGE_START sweep_device=cuda sweep_seconds="${SWEEP_SECONDS:-90}" select="anchors and bfloat16" suite=anchors
  if [ -n "$DRY" ]; then sweep_device=cpu sweep_seconds=5 select=cpu suite=cpu; fi
  # Each attention path once, in a process of its own with a time limit: a path that hangs,
  # crashes or is wrong is reported and stepped around for the rest of the stage (build/canary.env),
  # instead of hanging the sweep and the rows. Its Triton compiles stay cached for the sweep.
  echo "-- canary: each attention path once, alone ($((SECONDS - start)) s into the stage)"
  rm -f build/canary.env
  TFORMER_AUTOTUNE=0 timeout -k 10 150 "$PY" -m bench.gpu_canary --device "$sweep_device" --timeout 120 \
    --env-out build/canary.env 2>&1 | tee "$OUT/canary.log" || status=1
  [ -f build/canary.env ] && . build/canary.env
  local without_cuda=${TFORMER_GPU_SKIP_CUDA:+--exclude cuda}
  # A slow build leaves the sweep less: the whole stage, build included, stays near 400 s.
  [ $((SECONDS - start)) -gt 150 ] && [ "$sweep_seconds" -gt 60 ] && sweep_seconds=60
  echo "-- sweep: $sweep_seconds s on $sweep_device"
  # No autotuning in the sweep: each kernel variant compiles once (the benchmarks tune).
  # Then FlashAttention's test grid (bench/flash_attn_grid.py), in a seeded random order for
  # FLASH_GRID_SECONDS (default 60; FLASH_GRID_SECONDS=0 skips it, a large value runs all of it).
  local grid_seconds=${FLASH_GRID_SECONDS:-60}
  # A dry run leaves the grid out: its cases run for minutes under the CPU interpreter, and
  # tests/test_flash_attn_grid.py runs a sample of it on the CPU already.
  [ -n "$DRY" ] && grid_seconds=${FLASH_GRID_SECONDS:-0}
  TFORMER_AUTOTUNE=0 timeout -k 10 $((sweep_seconds + grid_seconds + 40)) "$PY" -m bench.gpu_sweep --device "$sweep_device" \
    --seconds "$sweep_seconds" --out "$OUT/sweep.json" ${SWEEP_SEED:+--seed "$SWEEP_SEED"} $without_cuda \
    --flash-grid full --flash-grid-seconds "$grid_seconds" 2>&1 \
    | tee "$OUT/sweep.log" | tail -n 60 || status=1
  # The rest of 400 s goes to the anchors: tformer's backends and the anchors the issue names
  # (attention fwd and fwd+bwd, the row ops fwd and bwd), 30 ms of repeats a row; the atomic-dQ
  # A/B rows wait for the kernels-attention stage (their autotuning would eat this budget). SIGINT at the
  # limit ends pytest's session cleanly, so the JSON of the rows done is still written.
  local left=$(( 390 - (SECONDS - start) > 45 ? 390 - (SECONDS - start) : 45 ))
  echo "-- anchors: at most $left s ($((SECONDS - start)) s into the stage)"
  TFORMER_BENCH_MEASURE_SECONDS=0.03 timeout -s INT -k 30 "$left" "$PY" -m pytest --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/first.json" bench/bench_attention.py bench/bench_layer_norm.py bench/bench_softmax.py \
    -k "$select and (tformer-triton or tformer-cuda or sdpa-flash or sdpa-cudnn or torch-$suite or liger) \
and not (bench_attention and [bwd-) and not atomic-dq${without_cuda:+ and not tformer-cuda}" -rfE --tb=line --benchmark-columns=median,rounds > "$OUT/first_pytest.log" 2>&1 \
    || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/first_pytest.log" | tail -n 20
  echo "first: stage wall time, build included, $((SECONDS - start)) s; under $OUT: device.txt canary.log sweep.json sweep.log first.json first_pytest.log report.md"
  # Last: the ratio table (report.md; the plots are drawn later from first.json, since a call
  # brings back at most 8 files).
  "$PY" -m bench.report "$OUT/first.json" --no-plots --out-dir build/first_report && cp build/first_report/report.md \
    "$OUT/report.md" || status=1
}

second_stage() {  # the second call (about 6.5 minutes at most): DecoderLM step vs PyTorch, then Shakespeare
  local start=$SECONDS extra=() size=d512 limit
  [ -n "$(ls tformer/_C*.so 2>/dev/null)" ] || echo "second: no CUDA extension built here (run 'first' on this machine first); auto uses Triton"
  if [ -n "$DRY" ]; then
    size=tiny
    extra=(--set training.compile=false --set training.precision=fp32 --set model.d_model=32 --set model.n_layers=1
           --set model.n_heads=2 --set data.seq_len=32 --set training.micro_batch_size=2 --set run.eval_interval=2
           --set run.eval_batches=1 --set run.final_eval_batches=1 --set run.steps=4 --set sample.max_new_tokens=8)
  fi
  # ANCHORS.md's d 512 model, T 1024: tformer's triton and cuda backends and plain PyTorch, eager and compiled.
  # No plots: a call brings back at most 8 files (draw them later from train_step.json).
  BENCH_TIMEOUT=150 BENCH_REPORT_ARGS=--no-plots bench train_step bench/bench_train_step.py \
    -k "$size and not tformer-reference"
  limit=${SHAKESPEARE_SECONDS:-$(( 360 - (SECONDS - start) < 180 ? 360 - (SECONDS - start) : 180 ))}
  echo "-- shakespeare: run.time_limit_s=$limit ($((SECONDS - start)) s into the stage)"
  timeout -k 10 $(( limit + 60 )) "$PY" tformer/train.py --config shakespeare_gpu.json \
    --set run.out_dir=runs/shakespeare_first_gpu --set logging.wandb=false --set run.time_limit_s="$limit" \
    "${extra[@]}" 2>&1 | tr '\r' '\n' | grep -v "step/s" > "$OUT/shakespeare.log" || status=1
  # The run's checkpoints stay there (too big and too many files to come back); its metrics come back.
  cp runs/shakespeare_first_gpu/metrics.jsonl "$OUT/shakespeare_metrics.jsonl" 2>/dev/null
  echo "second: stage wall time $((SECONDS - start)) s; under $OUT: train_step.json train_step/report.md" \
    "shakespeare.log shakespeare_metrics.jsonl"
  # Last: every evaluation (val loss with time/elapsed_s), then the run's last lines.
  grep -E "^step [0-9]+:" "$OUT/shakespeare.log"; tail -n 8 "$OUT/shakespeare.log"
}

for stage in "$@"; do
  echo "== stage $stage ($(date -u +%FT%TZ))"
  STAGE_START=$SECONDS
  # The IMDb recipe runs on the Triton kernels: the CUDA build would take minutes of its 10.
  case "$stage" in imdb*|second) ;; *) build ;; esac
  case "$stage" in
    first) first_stage ;;
    second) second_stage ;;
    tests) run_tests rows; run_tests attention ;;
    tests-rows) run_tests rows ;;
    tests-attention) run_tests attention ;;
    sanitize)
      for tool in memcheck racecheck synccheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" bench/sanitize_cuda_attention.py 2>&1 \
          | tail -n 20 || status=1
      done ;;
    kernels) bench kernels bench/bench_attention.py bench/bench_layer_norm.py bench/bench_softmax.py \
      -k "anchors and bfloat16" ;;
    kernels-attention) bench kernels_attention bench/bench_attention.py -k "anchors and bfloat16" ;;
    kernels-rows) bench kernels_rows bench/bench_layer_norm.py bench/bench_softmax.py -k "anchors and bfloat16" ;;
    sweep) bench sweep bench/bench_attention.py -k "seq_sweep or (anchors and float16)" ;;
    train-step) bench train_step bench/bench_train_step.py ;;
    hf) bench hf bench/bench_hf_attention.py ;;
    profile)
      ncu --set full --profile-from-start off --launch-count 8 -f -o "$OUT/profile" \
        "$PY" -m bench.profile_attention ${PROFILE:---shape 4,16,4096,128 --causal --backend triton --pass bwd} \
        2>&1 | tail -n 15 || status=1
      ncu --import "$OUT/profile.ncu-rep" --page details > "$OUT/profile.txt" 2>&1 || status=1
      grep -E "^  [a-z_]|Duration|Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Shared Memory Config" \
        "$OUT/profile.txt" | head -n 80 ;;
    shakespeare)
      timeout 540 "$PY" tformer/train.py --config "${SHAKESPEARE_CONFIG:-shakespeare_gpu.json}" \
        --set run.out_dir="$OUT/shakespeare" --set logging.wandb=false \
        2>&1 | tr '\r' '\n' | grep -v "step/s" > "$OUT/shakespeare.log" || status=1
      # Every evaluation (val loss with the wall time since the start), then the last samples.
      grep -E "^step [0-9]+:" "$OUT/shakespeare.log"; tail -n 12 "$OUT/shakespeare.log" ;;
    imdb-pretrain) imdb_pretrain || status=1 ;;
    imdb-finetune) imdb_finetune || status=1 ;;
    imdb) imdb_pretrain || status=1; imdb_finetune || status=1 ;;
    imdb-scratch) imdb_train scratch imdb_scratch.json --set run.out_dir="$OUT/imdb_scratch" || status=1 ;;
    *) echo "unknown stage $stage (first, second, tests, tests-rows, tests-attention, sanitize, kernels, kernels-attention," \
            "kernels-rows, sweep, train-step, hf, profile, shakespeare, imdb-pretrain, imdb-finetune, imdb, imdb-scratch)"
       exit 2 ;;
  esac
done
exit $status
