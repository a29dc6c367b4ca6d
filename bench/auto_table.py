"""The shipped starting guess of ``backend="auto"`` on a GPU (tformer/ops/measured_order.py; the
device's own self-check replaces it), from a benchmark run: per op, dtype and measured shape,
tformer's backends (torch's included) fastest first, with their times.

    python -m bench.report RESULTS.json --auto-table tformer/ops/measured_auto.json

The time of a backend at a shape is its forward+backward median where that pass was measured,
else the sum of its measured passes, so the order follows what training runs. Entries of ops
that this run did not measure are kept from the existing file (the attention and the row
kernels are measured in separate device calls).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

TABLE_OPS = ("attention", "layer_norm", "softmax")


class AutoTableError(ValueError):
    pass


def _shape_fields(op: str, row: dict) -> dict:
    if op == "attention":
        _, _, seq, head_dim = row["shape"]
        return {"head_dim": head_dim, "seq": seq, "causal": bool(row["causal"])}
    return {"n": row["shape"][-1]}


def build_entries(rows: list[dict]) -> list[dict]:
    """One entry per (op, dtype, shape) that at least one tformer backend ran on a GPU."""
    times = defaultdict(lambda: defaultdict(dict))  # (op, dtype, shape...) -> backend -> pass -> seconds
    for row in rows:
        # auto's own row is a choice among the others, not a candidate for the table.
        if (row.get("op") in TABLE_OPS and row.get("kind") == "tformer" and row.get("median_s")
                and row["impl"] != "tformer-auto"):
            fields = _shape_fields(row["op"], row)
            key = (row["op"], row["dtype"], *sorted(fields.items()))
            times[key][row["impl"].removeprefix("tformer-")][row["pass"]] = row["median_s"]
    entries = []
    for (op, dtype, *fields), backends in sorted(times.items(), key=str):
        total = {name: passes.get("fwd+bwd", sum(passes.values())) for name, passes in backends.items()}
        order = sorted(total, key=total.get)
        entries.append({"op": op, "dtype": dtype, **dict(fields), "order": order,
                        "seconds": {name: total[name] for name in order}})
    return entries


def write_auto_table(path: Path, data: dict, rows: list[dict]) -> dict:
    """Write (merge into) the table at ``path`` from one run's rows; returns the table."""
    info = data.get("machine_info", {}).get("tformer", {})
    device = info.get("device", "")
    if not device or device.startswith("CPU"):
        raise AutoTableError(f"argument '--auto-table': the results come from {device or 'an unknown device'}; "
                             f"only a GPU run can order the GPU backends")
    entries = build_entries(rows)
    if not entries:
        raise AutoTableError("argument '--auto-table': the results hold no timed tformer attention, layer_norm or "
                             "softmax rows")
    measured_ops = {entry["op"] for entry in entries}
    kept = []
    if path.is_file():
        kept = [entry for entry in json.loads(path.read_text()).get("entries", []) if entry["op"] not in measured_ops]
    table = {"measured": {"device": device, "date": data.get("datetime", "?"), "command": info.get("command", "?"),
                          "torch": info.get("torch"), "triton": info.get("triton")},
             "entries": kept + entries}
    path.write_text(json.dumps(table, indent=1) + "\n")
    return table
