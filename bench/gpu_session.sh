#!/usr/bin/env bash
# One call per stage on a lent GPU (the `device` tool: 10 minutes a call, 30 minutes a session).
# Builds the extension, proves the kernels on the GPU, then measures them with the anchors in the
# same run. Everything worth keeping is written under $OUT (default: bench/gpu_out).
#
#   bash bench/gpu_session.sh tests       # build + GPU correctness: kernel tests, cuda extension, ctest
#   bash bench/gpu_session.sh sanitize    # compute-sanitizer memcheck + racecheck over the CUDA kernels
#   bash bench/gpu_session.sh kernels     # ANCHORS.md rows, bf16: attention, LayerNorm, softmax + report
#   bash bench/gpu_session.sh sweep       # attention sequence-length sweep 512..16k, fp16 rows
#   bash bench/gpu_session.sh train-step  # DecoderLM training step vs plain PyTorch (eager, compiled)
#   bash bench/gpu_session.sh shakespeare # the GPU recipe: val loss <= 1.40 within 3 minutes?
#   IMDB=device_carry/aclImdb_labeled.tar.gz bash bench/gpu_session.sh imdb   # >= 90% test in 10 min?
#     (copy the archive into the git-ignored device_carry/ and name it in the call's `carry`)
#
# Stages can be chained: `bash bench/gpu_session.sh tests kernels`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" WANDB_MODE=disabled
status=0

build() {
  [ -n "$(ls tformer/_C*.so 2>/dev/null)" ] && return
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
  TFORMER_BUILD_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 5
}

bench() {  # bench NAME PYTEST-ARGS...
  local name=$1; shift
  python3 -m pytest bench --benchmark-only -q --benchmark-json "$OUT/$name.json" "$@" 2>&1 | tail -n 30 || status=1
  python3 -m bench.report "$OUT/$name.json" --out-dir "$OUT/$name" && cat "$OUT/$name/report.md" || status=1
}

for stage in "$@"; do
  echo "== stage $stage ($(date -u +%FT%TZ))"
  build
  case "$stage" in
    tests)
      python3 -m pytest -q -x tests/test_layer_norm.py tests/test_softmax.py tests/test_attention.py \
        tests/test_cuda_extension.py tests/test_cuda_attention_extension.py tests/test_registry.py tests/test_nn.py 2>&1 | tee "$OUT/tests.log" | tail -n 25 || status=1
      (cmake -B build-cmake -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null && cmake --build build-cmake -j16 >/dev/null \
        && ctest --test-dir build-cmake --output-on-failure) 2>&1 | tail -n 15 || status=1 ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 1 python3 bench/sanitize_cuda_attention.py 2>&1 \
          | tail -n 20 || status=1
      done ;;
    kernels) bench kernels -k "anchors and bfloat16" ;;
    sweep) bench sweep -k "seq_sweep or (anchors and float16)" bench/bench_attention.py ;;
    train-step) bench train_step bench/bench_train_step.py ;;
    shakespeare)
      timeout 540 python3 tformer/train.py --config shakespeare_gpu.json --set run.out_dir="$OUT/shakespeare" --set logging.wandb=false \
        2>&1 | tr '\r' '\n' | grep -v "step/s" | tail -n 40 || status=1 ;;
    imdb)
      timeout 590 python3 tformer/train.py --config imdb.json --set data.path="${IMDB:?set IMDB to the archive}" \
        --set run.out_dir="$OUT/imdb" --set logging.wandb=false 2>&1 | tr '\r' '\n' | grep -v "step/s" | tail -n 40 \
        || status=1 ;;
    *) echo "unknown stage $stage (tests, sanitize, kernels, sweep, train-step, shakespeare, imdb)"; exit 2 ;;
  esac
done
exit $status
