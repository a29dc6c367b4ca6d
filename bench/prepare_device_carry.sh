#!/usr/bin/env bash
# Fill the git-ignored device_carry/ with what bench/gpu_session.sh needs on a lent GPU that its
# image lacks (run here, before the session; name device_carry in the device call's `carry`):
#   wheels/  Liger-Kernel, the LayerNorm anchor (the image has torch, Triton, transformers,
#            tokenizers, safetensors, tqdm, PyYAML and matplotlib already; see the device
#            tool's KINDS.md)
#   aclImdb_labeled.tar.gz  the IMDb archive for the imdb* stages (../shared/data)
# About 31 MB of the 64 MiB a call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p device_carry/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d device_carry/wheels liger-kernel==0.8.5
imdb="${IMDB_ARCHIVE:-../shared/data/aclImdb_labeled.tar.gz}"
[ -f "$imdb" ] && cp "$imdb" device_carry/ || echo "no IMDb archive at $imdb: the imdb* stages need one"
du -sh device_carry
