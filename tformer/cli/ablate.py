"""``tformer ablate``: train a grid of model variants and write a report comparing them.

    tformer ablate --config ablate_shakespeare.json          # the shipped grid (configs/)
    tformer ablate --config grid.json --only positional      # one axis
    tformer ablate --config grid.json --list                 # the variants and their overrides
    tformer ablate --config grid.json --report-only          # rewrite the report from results

Each variant x seed trains in this process, one after another, with the same data, seeds and
budget; runs already finished (``result.json`` in their folder) are not trained again, so a
stopped grid continues where it was. The grid file format is described in
:mod:`tformer.experiments.grid`; the outputs are ``report.md``, ``results.csv`` and
``plots/`` in the grid's ``out_dir``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tformer.experiments.grid import load_grid
from tformer.experiments.report import write_report
from tformer.experiments.runner import run_grid
from tformer.schema import ConfigError


def build_parser(prog: str = "tformer ablate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="the grid file (JSON or YAML): a path, or a bare name in configs/ such as "
                             "ablate_shakespeare.json")
    parser.add_argument("--out-dir", default=None, help="where runs and the report go (default: the grid's out_dir)")
    parser.add_argument("--only", action="append", default=[], metavar="AXIS",
                        help="run only this axis (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the variants and their overrides, train nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing; write the report from the runs already finished")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "tformer ablate") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.config)
    except (ConfigError, FileNotFoundError) as error:
        parser.error(str(error))
    if args.out_dir:
        grid.out_dir = Path(args.out_dir)
    if args.only:
        axes = {v.axis for v in grid.variants}
        unknown = sorted(set(args.only) - axes)
        if unknown:
            parser.error(f"argument --only: unknown axes {unknown}; the grid has {sorted(axes)}")
        grid.variants = [v for v in grid.variants if v.axis in args.only]
    if args.list:
        for variant in grid.variants:
            need = f"  [needs {variant.requires}]" if variant.requires else ""
            print(f"{variant.name}: {' '.join(variant.overrides)}{need}")
        return 0
    started = time.time()
    if args.report_only:
        from tformer.experiments.runner import missing_requirement, read_result, run_folder

        records = []
        for variant in grid.variants:
            reason = missing_requirement(variant)
            if reason:
                records += [{"variant": variant.name, "axis": variant.axis, "label": variant.label, "seed": seed,
                             "status": "skipped", "reason": reason} for seed in grid.seeds]
                continue
            key = grid.config_key(variant)
            for seed in grid.seeds:
                result = read_result(run_folder(grid, variant, seed, key))
                base = {"variant": variant.name, "axis": variant.axis, "label": variant.label, "seed": seed}
                records.append({**result, **base, "status": "reused", "config_key": key,
                                "run_dir": str(run_folder(grid, variant, seed, key))} if result else
                               {**base, "status": "skipped", "reason": "not trained yet"})
    else:
        records = run_grid(grid)
    report = write_report(records, grid.out_dir, seeds=grid.seeds, budget=grid.budget, description=grid.description,
                          title=f"Ablation report: {Path(str(args.config)).stem}")
    print(f"ablate: report {report} ({time.time() - started:.0f} s)")
    return 0
