"""Experiments over many runs: ablation grids of config overrides, run one after another,
compared in one report."""
