"""Turn pytest-benchmark's JSON into markdown tables and PNG plots.

    pytest bench --benchmark-only --benchmark-json RESULTS.json
    python -m bench.report RESULTS.json [--out-dir DIR]

Every tformer backend is shown as a ratio to the best anchor on the same row (> 1: tformer is
faster) and to each anchor the targets name (attention: SDPA's FA2 and cuDNN; LayerNorm and
softmax: torch and Liger), all measured in the same run. Plots: attention TFLOP/s against sequence length per
backend; LayerNorm and softmax GB/s against the measured copy ceiling.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from bench.auto_table import AutoTableError, write_auto_table

OPS = {"attention": ("tflops", "TFLOP/s"), "layer_norm": ("gbps", "GB/s"), "softmax": ("gbps", "GB/s")}
# Anchors the targets name (ANCHORS.md): each tformer backend also gets its ratio to each of
# these on every row, beside the ratio to the best anchor.
NAMED_ANCHORS = {"attention": ("sdpa-flash", "sdpa-cudnn"), "layer_norm": ("torch", "liger"),
                 "softmax": ("torch", "liger")}


def load_rows(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    rows = [dict(bench["extra_info"], name=bench["name"]) for bench in data["benchmarks"] if bench.get("extra_info")]
    return data, rows


def _row_key(row: dict) -> tuple:
    return (row["suite"], tuple(row["shape"]), row["dtype"], row.get("causal"))


def _shape_text(shape) -> str:
    return "×".join(map(str, shape))


def _format_key(key: tuple) -> list[str]:
    suite, shape, dtype, causal = key
    cells = [suite, _shape_text(shape), dtype]
    return cells + (["yes" if causal else "no"] if causal is not None else [])


def _fmt(value: float | None, digits: int = 1) -> str:
    """``digits`` decimals, except that small values (CPU smoke runs) keep 3 significant digits."""
    if value is None:
        return "—"
    if value != 0 and abs(value) < 10 ** (1 - digits):
        return f"{value:.3g}"
    return f"{value:,.{digits}f}"


def _ratio(ours: float | None, anchor: float | None) -> str:
    if ours is None or not anchor:
        return "—"
    return _fmt(ours / anchor, 2) + "×"


def header(data: dict, rows: list[dict]) -> str:
    info = data.get("machine_info", {}).get("tformer", {})
    first = rows[0] if rows else {}
    commit = data.get("commit_info", {})
    lines = [
        f"- device: {info.get('device', '?')}",
        f"- date: {data.get('datetime', '?')}",
        f"- software: torch {info.get('torch')}, CUDA {info.get('cuda')}, Triton {info.get('triton')}, "
        f"Python {info.get('python')}, tformer {info.get('tformer')} (commit {commit.get('id', '?')[:10]}"
        f"{', dirty' if commit.get('dirty') else ''})",
        f"- command: `{info.get('command', '?')}`",
        f"- ceilings measured in this run: copy {_fmt(first.get('ceiling_copy_gbps'))} GB/s "
        f"({first.get('ceiling_copy_bytes', 0) / 2**20:,.0f} MiB, read + written), "
        f"{first.get('ceiling_matmul_dtype')} matmul {first.get('ceiling_matmul_n')}³ "
        f"{_fmt(first.get('ceiling_matmul_tflops'), 2)} TFLOP/s",
    ]
    return "\n".join(lines)


def op_tables(rows: list[dict]) -> list[str]:
    """One markdown table per (op, pass): each candidate's throughput, the best anchor, and
    each tformer backend's ratio to it."""
    sections = []
    for op, (metric, unit) in OPS.items():
        by_pass = defaultdict(list)
        for row in rows:
            if row["op"] == op and metric in row:
                by_pass[row["pass"]].append(row)
        for pass_name, pass_rows in by_pass.items():
            impls = sorted({r["impl"] for r in pass_rows}, key=lambda name: (not name.startswith("tformer"), name))
            ours = [name for name in impls if name.startswith("tformer")]
            table = defaultdict(dict)
            for row in pass_rows:
                table[_row_key(row)][row["impl"]] = row[metric]
            key_columns = ["suite", "shape", "dtype"] + (["causal"] if op == "attention" else [])
            named = [anchor for anchor in NAMED_ANCHORS[op] if anchor in impls]
            columns = key_columns + [f"{name} {unit}" for name in impls] + ["best anchor"] + \
                [f"{name} / best" for name in ours] + [f"{name} / {anchor}" for name in ours for anchor in named]
            lines = [f"### {op} {pass_name} ({unit})", "", "| " + " | ".join(columns) + " |",
                     "|" + " --- |" * len(columns)]
            for key in sorted(table, key=lambda k: (k[0], k[2], k[1], str(k[3]))):
                values = table[key]
                anchors = {name: value for name, value in values.items() if not name.startswith("tformer")}
                best = max(anchors, key=anchors.get) if anchors else None
                cells = _format_key(key) + [_fmt(values.get(name)) for name in impls]
                cells.append(f"{best} ({_fmt(anchors[best])})" if best else "—")
                for name in ours:
                    cells.append(_ratio(values.get(name), anchors.get(best)))
                for name in ours:
                    cells += [_ratio(values.get(name), anchors.get(anchor)) for anchor in named]
                lines.append("| " + " | ".join(cells) + " |")
            sections.append("\n".join(lines))
    return sections


# op -> (title, the anchor every row is divided by)
TRAIN_STEPS = {
    "train_step": ("training step (tokens/s; ratio to plain PyTorch + torch.compile, else plain eager)",
                   "plain-torch"),
    "hf_train_step": ("Hugging Face Llama-style training step, attn_implementation='tformer' (tokens/s; ratio "
                      "to attn_implementation='sdpa')", "hf-sdpa"),
}


def train_step_table(rows: list[dict], op: str = "train_step") -> str | None:
    title, anchor = TRAIN_STEPS[op]
    steps = [row for row in rows if row["op"] == op and "tokens_per_s" in row]
    if not steps:
        return None
    lines = [f"### {title}", "",
             "| model | batch × T | impl | mode | tokens/s | MFU (device peak) | fraction of matmul ceiling | "
             f"peak GiB | ratio to {anchor} |", "|" + " --- |" * 9]
    for model in sorted({row["model"] for row in steps}):
        model_rows = [row for row in steps if row["model"] == model]
        baseline = {row["mode"]: row["tokens_per_s"] for row in model_rows if row["impl"] == anchor}
        base_mode = "compile" if "compile" in baseline else "eager"
        for row in sorted(model_rows, key=lambda r: (r["impl"], r["mode"])):
            ratio = row["tokens_per_s"] / baseline[base_mode] if base_mode in baseline else None
            lines.append(f"| {model} | {row['batch']} × {row['seq_len']} | {row['impl']} | {row['mode']} | "
                         f"{_fmt(row['tokens_per_s'], 0)} | {_fmt(row.get('mfu'), 3)} | "
                         f"{_fmt(row['fraction_of_matmul_ceiling'], 3)} | {_fmt(row['peak_memory_gib'], 2)} | "
                         f"{_fmt(ratio, 2)}{'×' if ratio is not None else ''} ({base_mode}) |")
    return "\n".join(lines)


def _pyplot():
    # Imported on first plot: the tables need no matplotlib; Agg draws without a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def plot_attention(rows: list[dict], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    attention = [row for row in rows if row["op"] == "attention" and "tflops" in row]
    sweep = [row for row in attention if row["suite"] == "seq_sweep"] or attention
    written = []
    for pass_name in sorted({row["pass"] for row in sweep}):
        figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for axis, causal in zip(axes, (False, True)):
            series = defaultdict(dict)
            for row in sweep:
                if row["pass"] == pass_name and bool(row["causal"]) == causal:
                    series[row["impl"]][row["seq_len"]] = max(row["tflops"], series[row["impl"]].get(row["seq_len"], 0))
            for impl, points in sorted(series.items()):
                lengths = sorted(points)
                style = "-o" if impl.startswith("tformer") else "--."
                axis.plot(lengths, [points[s] for s in lengths], style, label=impl)
            axis.set_xscale("log", base=2)
            all_lengths = sorted({length for points in series.values() for length in points})
            axis.set_xticks(all_lengths, [str(length) for length in all_lengths])
            axis.minorticks_off()
            axis.set_xlabel("sequence length")
            axis.set_title(f"attention {pass_name}, {'causal' if causal else 'full'}")
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("TFLOP/s")
        axes[1].legend(fontsize=8)
        written.append(_save(figure, out_dir / f"attention_{pass_name.replace('+', '_')}.png"))
    return written


def _bar_label(row: dict) -> str:
    return f"{_shape_text(row['shape'])}\n{row['dtype']}"


def plot_bandwidth(rows: list[dict], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    written = []
    for op in ("layer_norm", "softmax"):
        op_rows = [row for row in rows if row["op"] == op and "gbps" in row]
        passes = sorted({row["pass"] for row in op_rows}, reverse=True)  # fwd, bwd
        if not op_rows:
            continue
        figure, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4), squeeze=False)
        for axis, pass_name in zip(axes[0], passes):
            pass_rows = [row for row in op_rows if row["pass"] == pass_name]
            labels = sorted({_bar_label(r) for r in pass_rows})
            impls = sorted({r["impl"] for r in pass_rows})
            width = 0.8 / len(impls)
            for index, impl in enumerate(impls):
                values = {_bar_label(r): r["gbps"] for r in pass_rows if r["impl"] == impl}
                axis.bar([i + index * width for i in range(len(labels))], [values.get(l, 0) for l in labels],
                         width, label=impl)
            ceiling = pass_rows[0]["ceiling_copy_gbps"]
            axis.axhline(ceiling, color="black", linestyle="--", label=f"copy ceiling {ceiling:,.0f} GB/s")
            axis.axhline(0.9 * ceiling, color="gray", linestyle=":", label="90% of ceiling")
            # Each group's bars start at i; its centre is half the group's width further on.
            axis.set_xticks([i + (len(impls) - 1) * width / 2 for i in range(len(labels))], labels, fontsize=7)
            axis.set_ylabel("GB/s (bytes read + written)")
            axis.set_title(f"{op} {pass_name}")
            axis.legend(fontsize=7)
        written.append(_save(figure, out_dir / f"{op}.png"))
    return written


def build_report(data: dict, rows: list[dict], plots: list[Path]) -> str:
    parts = ["## Benchmark report", "", header(data, rows), ""]
    parts += [section + "\n" for section in op_tables(rows)]
    for op in TRAIN_STEPS:
        steps = train_step_table(rows, op)
        if steps:
            parts += [steps, ""]
    if plots:
        parts += ["Plots: " + ", ".join(f"`{path.name}`" for path in plots), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where report.md and the PNGs go (default: beside the JSON, <name>-report/)")
    parser.add_argument("--auto-table", type=Path, default=None,
                        help="also write (merge into) backend='auto''s per-shape table, e.g. "
                             "tformer/ops/measured_auto.json (GPU runs only)")
    parser.add_argument("--no-plots", action="store_true",
                        help="report.md alone (a GPU call brings back at most 8 files; plot later from the JSON)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"argument 'results': {args.results} is not a file")
    data, rows = load_rows(args.results)
    if not rows:
        parser.error(f"argument 'results': {args.results} holds no tformer benchmark rows (was it written by "
                     f"`pytest bench --benchmark-only --benchmark-json ...`?)")
    out_dir = args.out_dir or args.results.with_name(f"{args.results.stem}-report")
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else plot_attention(rows, out_dir) + plot_bandwidth(rows, out_dir)
    report = build_report(data, rows, plots)
    (out_dir / "report.md").write_text(report)
    print(report)
    print(f"[wrote {out_dir / 'report.md'} and {len(plots)} plots]")
    if args.auto_table is not None:
        try:
            table = write_auto_table(args.auto_table, data, rows)
        except AutoTableError as error:
            parser.error(str(error))
        print(f"[wrote {args.auto_table}: {len(table['entries'])} entries measured on {table['measured']['device']}]")


if __name__ == "__main__":
    main()
