"""The ablation report: ``results.csv`` (one row per run), ``report.md`` (one table per axis,
means and spreads over seeds) and plots (final validation loss per variant; training curves
per axis), written into the grid's folder."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

from tformer.visualization.curves import plot_training_curves, read_metrics
from tformer.visualization.plotting import pyplot, save_png

CSV_COLUMNS = ("variant", "axis", "label", "seed", "status", "val/loss", "val/bpc", "val/ppl", "final_train_loss",
               "steps", "tokens_per_s", "params", "wall_s", "config_key", "run_dir", "reason")
CURVE_PANELS = (("train loss", ("train/loss",)), ("validation loss", ("val/loss",)),
                ("validation bpc / ppl", ("val/bpc", "val/ppl")))


def summarize(records: list[dict]) -> list[dict]:
    """One row per variant, in grid order: mean, sample std and min/max over seeds of the final
    validation loss and bpc, mean tokens/s, parameter count; skipped variants keep their reason."""
    rows: dict[str, dict] = {}
    for record in records:
        row = rows.setdefault(record["variant"], {"variant": record["variant"], "axis": record["axis"],
                                                  "label": record["label"], "runs": []})
        if record["status"] == "skipped":
            row["reason"] = record["reason"]
        else:
            row["runs"].append(record)
    for row in rows.values():
        runs = row.pop("runs")
        row["seeds"] = len(runs)
        for metric in ("val/loss", "val/bpc", "val/ppl"):
            values = [r[metric] for r in runs if isinstance(r.get(metric), (int, float))]
            if values:
                row[metric] = statistics.fmean(values)
                row[f"{metric} std"] = statistics.stdev(values) if len(values) > 1 else float("nan")
                row[f"{metric} min"], row[f"{metric} max"] = min(values), max(values)
        speeds = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
        row["tokens_per_s"] = statistics.fmean(speeds) if speeds else None
        row["params"] = runs[0]["params"] if runs else None
        row["run_dirs"] = [r["run_dir"] for r in runs]
    return list(rows.values())


def axis_verdicts(rows: list[dict]) -> dict[str, dict]:
    """Per axis: the variant with the lowest mean validation loss, and for every other variant
    its gap to it and whether the gap is beyond the seed spread, i.e. the two variants' seed
    ranges [min, max] do not overlap."""
    verdicts: dict[str, dict] = {}
    for axis in dict.fromkeys(r["axis"] for r in rows):
        ranked = [r for r in rows if r["axis"] == axis and "val/loss" in r]
        if not ranked:
            continue
        best = min(ranked, key=lambda r: r["val/loss"])
        gaps = {}
        for row in ranked:
            if row is not best:
                separated = row["val/loss min"] > best["val/loss max"] if row["seeds"] > 1 and best["seeds"] > 1 \
                    else None
                gaps[row["variant"]] = (row["val/loss"] - best["val/loss"], separated)
        verdicts[axis] = {"best": best["variant"], "gaps": gaps}
    return verdicts


def write_csv(records: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({key: _csv_value(record.get(key)) for key in CSV_COLUMNS})
    return path


def _csv_value(value):
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


def _mean_std(row: dict, metric: str) -> str:
    if metric not in row:
        return "-"
    std = row[f"{metric} std"]
    return f"{row[metric]:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}")


def markdown_report(rows: list[dict], verdicts: dict, *, title: str, description: str, seeds: list[int],
                    budget: dict, plots: list[str]) -> str:
    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += [f"Seeds: {seeds}; budget per run: {budget or 'as in the base config'}. Loss and bpc are the "
              f"final validation figures, mean ± sample standard deviation over seeds. \"Beyond spread\": "
              f"the variant's seed range [min, max] of validation loss lies entirely above the best one's.", ""]
    for axis, verdict in verdicts.items():
        lines.append(f"- **{axis}**: best `{verdict['best']}`" + "".join(
            f"; `{name}` +{gap:.4f}" + {True: " (beyond spread)", False: " (within spread)", None: ""}[separated]
            for name, (gap, separated) in verdict["gaps"].items()))
    lines += ["", "| axis | variant | seeds | val loss | val bpc | Δ loss vs best | beyond spread | tokens/s | params |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "val/loss" not in row:
            lines.append(f"| {row['axis']} | `{row['variant']}` | 0 | skipped: {row.get('reason', 'no result')} "
                         f"| | | | | |")
            continue
        verdict = verdicts[row["axis"]]
        gap, separated = verdict["gaps"].get(row["variant"], (0.0, None))
        beyond = "best" if verdict["best"] == row["variant"] else {True: "yes", False: "no", None: "-"}[separated]
        speed = f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "-"
        lines.append(f"| {row['axis']} | `{row['variant']}` | {row['seeds']} | {_mean_std(row, 'val/loss')} | "
                     f"{_mean_std(row, 'val/bpc')} | {gap:+.4f} | {beyond} | {speed} | {row['params']:,} |")
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def plot_final_losses(rows: list[dict], path: Path, *, width: float = 10.0, height: float = 5.0) -> Path:
    """Horizontal bars of each variant's mean final validation loss, seed min/max as error bars."""
    done = [r for r in rows if "val/loss" in r]
    if not done:
        raise ValueError("plot_final_losses: no variant has a result")
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(width, height))
    means = [r["val/loss"] for r in done]
    errors = [[r["val/loss"] - r["val/loss min"] for r in done], [r["val/loss max"] - r["val/loss"] for r in done]]
    axes_names = list(dict.fromkeys(r["axis"] for r in done))
    colors = plt.get_cmap("tab10")
    axis.barh(range(len(done)), means, xerr=errors, capsize=3,
              color=[colors(axes_names.index(r["axis"]) % 10) for r in done])
    axis.set_yticks(range(len(done)), [r["variant"] for r in done], fontsize="small")
    axis.invert_yaxis()
    low, high = min(r["val/loss min"] for r in done), max(r["val/loss max"] for r in done)
    margin = max(high - low, 1e-3) * 0.3
    axis.set_xlim(low - margin, high + margin)
    axis.set_xlabel("final validation loss (nats/token), bar: mean, whiskers: seed min-max")
    axis.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    return save_png(figure, path)


def write_report(records: list[dict], out_dir: Path, *, seeds: list[int], budget: dict, description: str = "",
                 title: str = "Ablation report") -> Path:
    """results.csv, report.md and plots/ in ``out_dir``; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(records, out_dir / "results.csv")
    rows = summarize(records)
    verdicts = axis_verdicts(rows)
    plots = []
    if any("val/loss" in r for r in rows):
        plot_final_losses(rows, out_dir / "plots" / "final_val_loss.png")
        plots.append("plots/final_val_loss.png")
    for axis in verdicts:
        runs = {}
        for row in rows:
            if row["axis"] == axis and row["run_dirs"]:
                # The first seed's curves: one line per variant keeps the panels readable.
                runs[row["label"]] = read_metrics(row["run_dirs"][0])
        name = f"plots/curves_{_slug(axis)}.png"
        plot_training_curves(runs, out_dir / name, panels=CURVE_PANELS, height=4.5, title=f"{axis} (seed {seeds[0]})")
        plots.append(name)
    report = out_dir / "report.md"
    report.write_text(markdown_report(rows, verdicts, title=title, description=description, seeds=seeds,
                                      budget=budget, plots=plots))
    return report


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)
