#!/usr/bin/env bash
# Rehearse the GPU session here, on the CPU, with the GPU image's torch and Triton (torch
# 2.11.0+cu130 and Triton 3.6.0: the device tool's KINDS.md) instead of the torch we develop on.
# A copy of the working tree gets a venv of its own with those versions, builds the CUDA extension
# against their headers (compile and link; no GPU needed), then runs both stages of
# bench/gpu_session.sh dry and the tests that need no GPU. A header or API change between the two
# torch releases then shows up here, not in a 15-minute GPU window.
#
#   bash bench/rehearse_device_image.sh                      # build, dry stages, default tests
#   bash bench/rehearse_device_image.sh tests/test_nn.py     # other pytest arguments instead
#
# Downloads about 3 GB (torch's CUDA wheels) the first time; the venv is kept in build/ for the next
# run. NumPy is held below 2.4 because Triton 3.6's interpreter fails with it (tformer says so).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
TRITON_VERSION="${TRITON_VERSION:-3.6.0}"
WORK="${WORK:-$PWD/build/device-image}"
VENV="$WORK/venv" TREE="$WORK/tree"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-2}"
export PATH="$CUDA_HOME/bin:$PATH" WANDB_MODE=disabled
start=$SECONDS
stamp() { echo "== $((SECONDS - start)) s: $*"; }

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, triton, sys; \
sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or triton.__version__ != '$TRITON_VERSION')"; then
  stamp "venv with torch $TORCH_VERSION, Triton $TRITON_VERSION"
  rm -rf "$VENV" && python3 -m venv "$VENV"
  # The packages bench/gpu_session.sh's stages use that the GPU image has (no DeepSpeed, no wandb there).
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "numpy<2.4" pyyaml tqdm safetensors \
    tokenizers matplotlib "transformers>=5.0" pytest pytest-benchmark pytest-timeout scikit-learn setuptools wheel \
    2>&1 | grep -v "is ignored: it is neither" || true
fi
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

# The working tree as it is (uncommitted changes too), without build outputs: its own tformer/_C
# must not replace the one the developer's venv imports from this tree.
stamp "copy of the working tree"
rm -rf "$TREE" && mkdir -p "$TREE"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$TREE"

stamp "CUDA extension against torch $TORCH_VERSION's headers"
cd "$TREE"
TFORMER_BUILD_CUDA=1 "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . 2>&1 \
  | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import tformer._C, tformer; print('tformer._C built:', tformer._C.__file__)"

for stage in first second; do
  stamp "gpu_session.sh $stage, dry"
  GPU_SESSION_DRY_RUN=1 PY="$VENV/bin/python" OUT="$WORK/out_$stage" bash bench/gpu_session.sh "$stage" \
    > "$WORK/$stage.log" 2>&1 || { tail -n 40 "$WORK/$stage.log"; echo "rehearsal: stage $stage failed"; exit 1; }
  grep -E "^(canary:|[0-9]+ cases|first:|second:|step [0-9]+:)" "$WORK/$stage.log" | tail -n 8
done

stamp "tests"
# By default the files of the GPU stages' own machinery, the op registry and the extension's bindings
# and SASS; the whole suite also runs (add `tests`), in about 20 minutes.
[ $# -gt 0 ] || set -- tests/test_registry.py tests/test_gpu_canary.py tests/test_gpu_sweep.py \
  tests/test_cuda_extension.py tests/test_cuda_attention_sm90_sass.py tests/test_cuda_attention_sass.py
"$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider "$@"
stamp "rehearsal done"
