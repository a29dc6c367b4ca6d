"""``backend="auto"`` per shape, from GPU measurements.

``python -m bench.report RESULTS.json --auto-table tformer/ops/measured_auto.json`` writes, from
a GPU benchmark run, one entry per op, dtype and measured shape, with each backend's time (``times_ms``, torch's
included) where the run measured them. It is only ``auto``'s starting guess on a GPU: the
self-check's own timings on the device replace it (see :mod:`tformer.ops.auto`).

Nearest shape: attention entries must match causal, then the closest head dim, then the closest
key length on a log scale; LayerNorm and softmax entries the closest row length (RMSNorm uses
LayerNorm's, the packed attention the padded one's). The table says which device measured it,
when and with what command; ``auto`` logs that with its choice.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("measured_auto.json")
# Ops measured under another op's name: the same kernels with a different front.
MEASURED_AS = {"attention": "attention", "attention_varlen": "attention", "layer_norm": "layer_norm",
               "rms_norm": "layer_norm", "softmax": "softmax"}


@functools.cache
def load_table(path: Path = TABLE_PATH) -> dict:
    """The table at ``path``: ``{"measured": {...}, "entries": [...]}``; empty when absent."""
    if not path.is_file():
        return {"measured": {}, "entries": []}
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"tformer: {path} is not valid JSON ({error}); rewrite it with "
                         f"`python -m bench.report RESULTS.json --auto-table {path}` or delete it") from None
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        raise ValueError(f"tformer: {path} must hold {{'measured': {{...}}, 'entries': [...]}}, as bench.report "
                         f"writes it")
    return table


def shape_key(op: str, args: dict) -> dict | None:
    """What an entry is matched on, from an op's validated arguments; None when a size is
    symbolic (torch.compile with dynamic shapes): no guard is added for a choice of backend."""
    if MEASURED_AS[op] == "attention":
        seq = args["max_seqlen_k"] if op == "attention_varlen" else args["k"].shape[-2]
        key = {"head_dim": args["q"].shape[-1], "seq": seq, "causal": args["causal"]}
    else:
        key = {"n": args["x"].shape[-1]}
    return key if all(isinstance(value, (int, bool)) for value in key.values()) else None


def _distance(entry: dict, key: dict) -> tuple:
    def log_gap(a: int, b: int) -> float:
        return abs(math.log2(max(a, 1)) - math.log2(max(b, 1)))

    if "n" in key:
        return (log_gap(entry["n"], key["n"]),)
    return (log_gap(entry["head_dim"], key["head_dim"]), log_gap(entry["seq"], key["seq"]))


def nearest_entry(op: str, dtype_name: str, key: dict, entries: list[dict]) -> dict | None:
    """The entry measured nearest to ``key`` for this op and dtype, or None."""
    candidates = [entry for entry in entries
                  if entry["op"] == MEASURED_AS[op] and entry["dtype"] == dtype_name
                  and entry.get("causal", key.get("causal")) == key.get("causal")]
    if not candidates:
        return None
    return min(candidates, key=lambda entry: _distance(entry, key))
