"""The Triton attention backward lowers every dot to wgmma on an H100, proven without a GPU.

The dK/dV pass works on transposed (BLOCK_N, BLOCK_M) tiles so that its four dots have
BLOCK_N >= 64 rows, and the dQ pass's candidates have BLOCK_M >= 64: on sm_90 with 4 or more
warps Triton then emits ``ttng.warp_group_dot`` (wgmma.mma_async) instead of ``tt.dot``
(mma.sync, a quarter of the tensor-core rate). Each head-dim bucket's leading candidate is
lowered as a launch specializes it (bench.compile_audit), for 16-bit inputs, causal with
grouped-query heads (masks, padding and dropout change no dot; the expanded dK/dV way is the same
kernel with another head count), one config per bucket to keep the test to a few compiles. The
dK/dV pass with atomic dQ (TFORMER_ATTENTION_DQ=atomic) is checked the same way.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ON_GPU

_COUNT_DOTS = """
from bench.compile_audit import ATTENTION_FEATURES, attention_launches, lower_launch, ttgir_dots

feature = dict((f[0], f) for f in ATTENTION_FEATURES)["gqa-causal"]
for data, bucket in (("bf16", 64), ("fp16", 128), ("bf16", 256)):
    for name, kernel, tuned, args, meta in attention_launches(data, bucket, feature):
        if name in ("attention_bwd_dkdv", "attention_bwd_dq", "attention_bwd_dkdv_atomic_dq"):
            config = tuned.first_config(meta)
            dots = ttgir_dots(lower_launch(kernel, args, dict(meta, **config.kwargs), config.num_warps,
                                           config.num_stages))
            print(name, data, bucket, config, dots["warp_group_dot"], dots["dot"])
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels run in test_attention.py; this lowers them without one")
def test_every_backward_dot_is_a_warp_group_dot_on_sm90():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COUNT_DOTS], env=env, capture_output=True, text=True,
                            timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    rows = [line.split() for line in lines if line.startswith("attention_bwd")]
    # The atomic-dQ dK/dV adds dQ^T = K^T dS^T (head-dim rows) to its four.
    expected_dots = {"attention_bwd_dkdv": 4, "attention_bwd_dq": 3, "attention_bwd_dkdv_atomic_dq": 5}
    # Three buckets x (dK/dV, dQ, atomic-dQ dK/dV).
    assert len(rows) == 9, result.stdout
    for row in rows:
        name, warp_group_dots, plain_dots = row[0], int(row[-2]), int(row[-1])
        assert plain_dots == 0, f"{' '.join(row)}: {plain_dots} tt.dot not lowered to wgmma"
        assert warp_group_dots >= expected_dots[name], f"{' '.join(row)}: too few warp_group_dot"
