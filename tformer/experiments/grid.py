"""An ablation grid: a base training config, overrides shared by every run, and axes of
alternatives, each axis varied one at a time against the base (not a cartesian product).

The grid file (JSON or YAML)::

    {
      "base": "ds.json",                         # a config name/path, or the config itself as a dict
      "set": ["run.eval_interval=100"],          # --set overrides applied to every variant
      "seeds": [1, 2],                           # every variant runs once per seed (training.seed)
      "budget": {"steps": 300},                  # and/or {"time_limit_s": 60}: the same for every run
      "out_dir": "runs/ablate_shakespeare",
      "axes": [
        {"name": "positional", "key": "model.positional", "values": ["none", "rope"]},
        {"name": "heads", "variants": {"1x64": ["model.n_heads=1"], "4x16": ["model.n_heads=4"]}},
        {"name": "backend", "key": "model.backend", "values": ["reference", "triton"],
         "requires": {"triton": "cuda"}}
      ]
    }

A variant is named ``<axis>=<label>``; its overrides are the grid's ``set`` then its own (the
same dotted keys as ``--set``). Variants whose resolved configs are equal (the base choice
appears in every axis) share one run folder, named by a hash of that config, so the grid trains
each distinct config once per seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tformer.schema import ConfigError
from tformer.training.config import load_config, read_config_file, resolve_config_path

GRID_KEYS = ("base", "set", "seeds", "budget", "out_dir", "axes", "description")
BUDGET_KEYS = ("steps", "time_limit_s")
REQUIREMENTS = ("cuda",)


@dataclass
class Variant:
    """One point of the grid: ``axis=label`` with the overrides that make it."""

    axis: str
    label: str
    overrides: list[str]
    requires: str | None = None

    @property
    def name(self) -> str:
        return f"{self.axis}={self.label}"


@dataclass
class Grid:
    base: dict
    overrides: list[str]
    seeds: list[int]
    budget: dict
    out_dir: Path
    variants: list[Variant] = field(default_factory=list)
    description: str = ""

    def run_overrides(self, variant: Variant, seed: int) -> list[str]:
        """Every override of one run except its folder: grid ``set``, the variant, seed, budget."""
        budget = [f"run.{key}={json.dumps(value)}" for key, value in sorted(self.budget.items())]
        return [*self.overrides, *variant.overrides, f"training.seed={seed}", *budget]

    def config_key(self, variant: Variant) -> str:
        """A short hash of the variant's resolved config (seed and folder left out): equal configs,
        equal keys, one shared run folder."""
        loaded = load_config(self.base, self.run_overrides(variant, 0))
        config = loaded.to_dict()
        # The task's sections with their defaults filled in: an override that restates a default
        # gives the same key as leaving it out.
        config["model"] = loaded.model.to_dict()
        config["data"] = dataclasses.asdict(loaded.data)
        config["training"].pop("seed")
        config["run"].pop("out_dir")
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        return digest[:10]


def value_label(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def load_grid(source: str | os.PathLike | dict) -> Grid:
    """Read and check a grid file (a path, a bare name in ``configs/``, or a parsed dict)."""
    raw = source if isinstance(source, dict) else read_config_file(resolve_config_path(str(source)))
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"ablation grid: unknown keys {unknown}; valid keys: {list(GRID_KEYS)}")
    for key in ("base", "axes"):
        if key not in raw:
            raise ConfigError(f"ablation grid: missing {key!r}")
    base = raw["base"]
    base = read_config_file(resolve_config_path(base)) if isinstance(base, str) else base
    if not isinstance(base, dict):
        raise ConfigError(f"ablation grid: 'base' must be a config name/path or a mapping, got {type(base).__name__}")
    seeds = raw.get("seeds", [1337])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"ablation grid: 'seeds' must be a non-empty list of distinct ints, got {seeds!r}")
    budget = raw.get("budget", {})
    if not isinstance(budget, dict) or set(budget) - set(BUDGET_KEYS):
        raise ConfigError(f"ablation grid: 'budget' must be a mapping with keys among {BUDGET_KEYS}, got {budget!r}")
    overrides = raw.get("set", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"ablation grid: 'set' must be a list of 'section.key=value' strings, got {overrides!r}")
    grid = Grid(base=base, overrides=overrides, seeds=seeds, budget=budget,
                out_dir=Path(raw.get("out_dir", "runs/ablate")), description=raw.get("description", ""))
    grid.variants = expand_axes(raw["axes"])
    for variant in grid.variants:  # every variant's config is checked now, not after an hour of runs
        try:
            load_config(base, grid.run_overrides(variant, seeds[0]))
        except ConfigError as error:
            raise ConfigError(f"ablation grid: variant {variant.name!r}: {error}") from None
    return grid


def expand_axes(axes) -> list[Variant]:
    """The variants of every axis, in file order. An axis is either ``{"name", "key", "values"}``
    (one override per value) or ``{"name", "variants": {label: [overrides]}}``; ``requires``
    maps a label to what it needs to run (``"cuda"``)."""
    if not isinstance(axes, list) or not axes:
        raise ConfigError(f"ablation grid: 'axes' must be a non-empty list, got {axes!r}")
    variants, names, axis_names = [], set(), {}
    for number, axis in enumerate(axes):
        if not isinstance(axis, dict) or "name" not in axis:
            raise ConfigError(f"ablation grid: axes[{number}] must be a mapping with a 'name', got {axis!r}")
        name = axis["name"]
        if name in axis_names:  # the report groups by axis name: two would be mixed into one
            raise ConfigError(f"ablation grid: axes[{axis_names[name]}] and axes[{number}] are both named {name!r}; "
                              f"give each axis its own name")
        axis_names[name] = number
        unknown = sorted(set(axis) - {"name", "key", "values", "variants", "requires"})
        if unknown:
            raise ConfigError(f"ablation grid: axis {name!r}: unknown keys {unknown}")
        if "variants" in axis:
            if "key" in axis or "values" in axis or not isinstance(axis["variants"], dict) or not axis["variants"]:
                raise ConfigError(f"ablation grid: axis {name!r}: give either 'key' + 'values' or a non-empty "
                                  f"'variants' mapping of label -> overrides")
            points = [(str(label), list(overrides)) for label, overrides in axis["variants"].items()]
        elif "key" in axis and isinstance(axis.get("values"), list) and axis["values"]:
            points = [(value_label(v), [f"{axis['key']}={json.dumps(v)}"]) for v in axis["values"]]
        else:
            raise ConfigError(f"ablation grid: axis {name!r} needs 'key' and a non-empty 'values' list, or 'variants'")
        requires = axis.get("requires", {})
        labels = [label for label, _ in points]
        for label, need in requires.items():
            if label not in labels or need not in REQUIREMENTS:
                raise ConfigError(f"ablation grid: axis {name!r}: 'requires' maps labels {labels} to one of "
                                  f"{REQUIREMENTS}, got {label!r}: {need!r}")
        for label, overrides in points:
            variant = Variant(name, label, overrides, requires.get(label))
            if variant.name in names:
                raise ConfigError(f"ablation grid: variant {variant.name!r} appears twice")
            names.add(variant.name)
            variants.append(variant)
    return variants
