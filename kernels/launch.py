"""How the attention kernels (forward and both backward passes) are launched: their autotune
tables and tuner, the sequence-length bucket in the tuning key, the CUDA-graph capture guard,
the grid limits and the stride limit that keeps in-tile offsets in 32 bits.

On a GPU each kernel has a small autotune set per head-dim bucket and input precision; at
most 3 configs compile and run at the first call of each key (head dim bucket, causal,
dropout, sequence-length buckets, and the tensors' dtypes, which Triton adds). Under
TRITON_INTERPRET=1 (CPU tensors) one fixed small config runs, so that tests with lengths 17 or
33 cross block boundaries. ``python -m bench.compile_audit`` lowers every candidate for sm_90
as Triton specializes it at launch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import triton

INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
_TILES_SET_BY_TESTS: dict[str, dict[str, int]] = {}
_TILES_LAUNCHED: set[str] = set()


def interpreter_blocks(kernel) -> dict[str, int]:
    """The blocks ``kernel`` runs with under the interpreter: INTERPRETER_BLOCKS, unless
    ``interpreter_tiles`` named it."""
    if kernel.__name__ in _TILES_SET_BY_TESTS:
        _TILES_LAUNCHED.add(kernel.__name__)
        return _TILES_SET_BY_TESTS[kernel.__name__]
    return INTERPRETER_BLOCKS


@contextmanager
def interpreter_tiles(**tiles: tuple[int, int]) -> Iterator[None]:
    """Under the interpreter, run the named kernels at these (BLOCK_M, BLOCK_N), e.g.
    ``interpreter_tiles(_dq_kernel=(128, 64))``: the autotune tables' tile shapes, which differ
    from INTERPRETER_BLOCKS' square ones, checked on the CPU (the tests' only use).

    Raises:
        RuntimeError: on leaving, a named kernel never launched in the block (a renamed kernel
            would otherwise leave its test running the square tiles unnoticed).
    """
    saved, launched = dict(_TILES_SET_BY_TESTS), set(_TILES_LAUNCHED)
    _TILES_SET_BY_TESTS.update({name: {"BLOCK_M": m, "BLOCK_N": n} for name, (m, n) in tiles.items()})
    _TILES_LAUNCHED.clear()
    try:
        yield
        never = sorted(set(tiles) - _TILES_LAUNCHED)
        if never:
            raise RuntimeError(f"interpreter_tiles: {', '.join(never)} never launched under the interpreter")
    finally:
        _TILES_SET_BY_TESTS.clear()
        _TILES_SET_BY_TESTS.update(saved)
        _TILES_LAUNCHED.clear()
        _TILES_LAUNCHED.update(launched | set(tiles))


# CUDA limits grid y and z (here heads and sequences) to 65,535 blocks each.
MAX_GRID_YZ = 65_535
# Offsets inside a tile (a row, column or head-dim index < 256 times a stride) are 32-bit for
# speed; every token, head or sequence start is 64-bit. A token or head-dim stride above
# 2^31 / 256 elements could push an in-tile offset past 2^31, so such tensors are refused.
MAX_TILE_EXTENT = 256
MAX_STRIDE = (2**31 - 1) // MAX_TILE_EXTENT
# Leading kernel arguments that carry the sequence-length buckets: in the tuning key only.
BUCKET_ARGS = ("seqlen_q_bucket", "seqlen_k_bucket")


def config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def configs_for_call(table: dict, fp32_table: dict, configs, named_args, atomic_dq_table: dict | None = None,
                     **kwargs):
    """Autotune pruning: only the candidates of this call's table (precision; the dK/dV pass's
    16-bit atomic-dQ variant has its own) for the bucket that holds BLOCK_D run."""
    if kwargs["DOT_PRECISION"] == "ieee":
        chosen = fp32_table
    else:
        chosen = atomic_dq_table if kwargs.get("ATOMIC_DQ") and atomic_dq_table is not None else table
    return chosen[min(bound for bound in chosen if bound >= kwargs["BLOCK_D"])]


def seqlen_bucket(seqlen: int) -> int:
    """The power of two at or above ``seqlen`` (at least 16): the best blocks change with the
    length (few long rows vs many short ones), not with every length."""
    return max(16, triton.next_power_of_2(seqlen))


@dataclass
class Tuned:
    """A kernel's autotuner, the candidate tables it prunes to, and the keys tuned so far."""

    autotuner: triton.runtime.Autotuner
    table: dict
    fp32_table: dict
    atomic_dq_table: dict | None = None
    tuned_keys: set = field(default_factory=set)

    def candidates(self, meta: dict) -> list[triton.Config]:
        """The configs the autotuner times for a call with these constexprs."""
        return configs_for_call(self.table, self.fp32_table, None, None, self.atomic_dq_table, **meta)

    def first_config(self, meta: dict) -> triton.Config:
        """The leading candidate for this call: what runs when autotuning is off."""
        return self.candidates(meta)[0]

    @staticmethod
    def key(args: tuple, meta: dict) -> tuple:
        """Everything Triton's tuning key can hold for this call (it keys on a subset of the
        constexprs, the bucket arguments and the tensors' dtypes), so a key seen here means
        Triton's cache has the call's config."""
        dtypes = tuple(str(arg.dtype) for arg in args if hasattr(arg, "dtype"))
        return tuple(sorted(meta.items())), args[-2:], dtypes


def autotuned(kernel, table: dict, fp32_table: dict, atomic_dq_table: dict | None = None) -> Tuned:
    configs = [c for t in (table, fp32_table, atomic_dq_table or {}) for bucket in t.values() for c in bucket]
    # cache_results: the winning config is kept in Triton's disk cache, so a later process
    # with a warm cache neither recompiles nor re-times.
    # HAS_DROPOUT and ATOMIC_DQ (dK/dV only; Triton skips key names a kernel lacks) in the key:
    # those paths hold more registers (their best block may differ), so they are tuned on their own.
    tuner = triton.autotune(configs, key=["BLOCK_D", "HAS_BAND", "HAS_DROPOUT", "ATOMIC_DQ", *BUCKET_ARGS], cache_results=True,
                            prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: configs_for_call(
                                table, fp32_table, configs, named_args, atomic_dq_table, **kw)})(kernel)
    return Tuned(tuner, table, fp32_table, atomic_dq_table)


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def launch(kernel, tuned: Tuned | None, grid_of: Callable[[dict], tuple], args: tuple, meta: dict,
           device: torch.device, autotune: bool = True) -> None:
    """Run ``kernel`` with the interpreter's fixed blocks on CPU tensors, else autotuned (or
    with the leading candidate when autotuning is off, or with ``meta`` alone when the kernel
    has no tuner). ``args`` ends with the two sequence-length buckets of tuned kernels.

    Raises:
        RuntimeError: a CUDA graph is being captured and this call's key has not been tuned:
            tuning times the candidates by launching them, which a capture would record.
    """
    if tuned is None:
        kernel[grid_of(meta)](*args, **meta)
    elif device.type == "cpu":
        blocks = interpreter_blocks(kernel)
        kernel[grid_of(blocks)](*args, **meta, **blocks)
    elif autotune:  # False: the leading candidate untimed, one compile per variant (TFORMER_AUTOTUNE=0)
        key = tuned.key(args, meta)
        if key not in tuned.tuned_keys and capturing(device):
            raise RuntimeError(
                f"{kernel.__name__}: this call would autotune while a CUDA graph is being captured "
                f"(head-dim bucket {meta['BLOCK_D']}, sequence-length buckets {args[-2]}/{args[-1]}); run the same "
                "shapes once eagerly before capturing, or set TFORMER_AUTOTUNE=0")
        tuned.autotuner[grid_of](*args, **meta)
        tuned.tuned_keys.add(key)
    else:
        chosen = tuned.first_config(meta)
        kernel[grid_of(chosen.kwargs)](*args, **meta, **chosen.kwargs, num_warps=chosen.num_warps,
                                       num_stages=chosen.num_stages)


def check_grid_yz(num_heads: int, num_seqs: int, varlen: bool) -> None:
    """Refuse a launch whose heads (grid y) or sequences (grid z) exceed CUDA's 65,535."""
    if num_heads > MAX_GRID_YZ:
        raise ValueError(f"attention: argument 'q' has {num_heads} heads, at most {MAX_GRID_YZ} are supported")
    if num_seqs > MAX_GRID_YZ:
        what = (f"argument 'cu_seqlens_q' describes {num_seqs} sequences" if varlen
                else f"argument 'q' has batch size {num_seqs}")
        raise ValueError(f"attention: {what}, at most {MAX_GRID_YZ} are supported")


def check_tile_strides(**strides: tuple[int, ...]) -> None:
    """Refuse token or head-dim strides (the ones offsets inside a tile multiply) of 2^31 / 256
    elements or more (see ``MAX_STRIDE``). ``strides``: argument name -> those strides."""
    for name, values in strides.items():
        if any(abs(stride) > MAX_STRIDE for stride in values):
            raise ValueError(f"attention: argument '{name}' has token/head-dim strides {tuple(values)}; each must be "
                             f"at most {MAX_STRIDE} elements (pass a contiguous tensor)")
