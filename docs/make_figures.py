"""Draw the documentation's pictures from a real short run, on the CPU, with tformer's own tools.

    python docs/make_figures.py                 # writes docs/figures/*.png (about a minute on 2 cores)
    python docs/make_figures.py --out-dir /tmp/figures --work-dir /tmp/runs

What it runs, in one process, through the same entry points as the ``tformer`` commands:

1. ``tformer train``: the character LM on the bundled Tiny Shakespeare, shrunk to 2 layers, d 64,
   a few hundred steps on the reference backend (seeded, fp32, one thread);
2. ``tformer visualize attention``, ``curves`` and ``gradients`` on that run;
3. ``tformer ablate``: a one-seed grid over the positional encoding (none, learned, RoPE) at the
   same size, whose report chart is the ablation figure;
4. a t-SNE (``tformer.visualization.embeddings``) of all-MiniLM-L6-v2 sentence embeddings
   (``tformer.models.SentenceEncoder``) of sentences on four topics. It needs the ``pretrained``
   extra; without it the figure is skipped with the reason and the script fails unless
   ``--allow-missing`` is given.

The figures are generated, not committed: CI runs this script, then ``mkdocs build --strict``,
which fails if a page shows a picture the script did not make.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
FIGURES = ("attention.png", "training_curves.png", "gradient_flow.png", "ablation.png",
           "ablation_curves.png", "sentence_tsne.png")

# The main job's config cut to CPU-figure size: every run here is seeded and single-threaded, so
# the figures change only when the code does.
SMALL_LM = [
    "deepspeed=null", "training.strategy=single", "training.precision=fp32", "training.threads=1",
    "training.micro_batch_size=16", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
    "model.backend=reference", "data.seq_len=64", "optimizer.warmup_steps=20", "run.log_interval=10",
    "run.eval_batches=2", "run.final_eval_batches=4", "sample.max_new_tokens=16", "logging.wandb=false",
    "logging.progress_bar=false",
]

# Sentences on four topics: the t-SNE should show four groups.
TOPICS = {
    "space": ["The rocket reached orbit after a smooth launch.", "Astronauts repaired the station's solar panel.",
              "A new telescope photographed a distant galaxy.", "The probe sent back images of Saturn's rings.",
              "Mars rovers search the rocks for signs of water.", "The crew trained for months before the mission.",
              "A comet passed close to the sun this spring.", "Engineers tested the lunar lander's engines.",
              "The satellite maps the ocean from space.", "Scientists found a planet orbiting a nearby star."],
    "cooking": ["Knead the dough until it is smooth and elastic.", "Simmer the tomato sauce for twenty minutes.",
                "Roast the vegetables with olive oil and salt.", "Whisk the eggs and sugar until pale.",
                "The soup needs more pepper and a little lemon.", "Bake the bread until the crust is golden.",
                "Chop the onions finely before frying them.", "Let the cake cool before adding the icing.",
                "She grilled the fish with garlic and herbs.", "Stir the risotto slowly, adding stock bit by bit."],
    "football": ["The striker scored twice in the second half.", "The goalkeeper saved a late penalty.",
                 "Fans filled the stadium for the cup final.", "The coach changed the team's formation.",
                 "A red card left them with ten players.", "The midfielder passed the ball into space.",
                 "They won the league on the last match day.", "The referee added five minutes of stoppage time.",
                 "Both teams pressed high from the kick-off.", "A header from the corner levelled the score."],
    "finance": ["Stocks fell after the central bank raised rates.", "The company reported higher quarterly profits.",
                "Investors moved money into government bonds.", "The currency weakened against the dollar.",
                "Inflation slowed for the third month in a row.", "The bank cut its growth forecast for next year.",
                "Shares of the carmaker jumped on strong sales.", "Oil prices rose as supply tightened.",
                "The startup raised fifty million in new funding.", "Mortgage rates climbed to a ten-year high."],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/make_figures.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DOCS / "figures", help="where the PNGs go (default: docs/figures)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=240, help="training steps of the LM run (default: 240)")
    parser.add_argument("--ablation-steps", type=int, default=120, help="steps per ablation run (default: 120)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="skip a figure whose optional dependency is missing instead of failing")
    args = parser.parse_args(argv)
    if args.steps < 20 or args.ablation_steps < 20:
        parser.error(f"--steps and --ablation-steps must be >= 20, got {args.steps} and {args.ablation_steps}")

    temporary = None if args.work_dir else tempfile.TemporaryDirectory(prefix="tformer-figures-")
    work = Path(args.work_dir or temporary.name)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    try:
        missing = []
        _timed("LM run + attention, curves, gradient flow", lambda: lm_figures(work, out, args.steps))
        _timed("ablation grid", lambda: ablation_figures(work, out, args.ablation_steps))
        try:
            _timed("sentence t-SNE", lambda: sentence_tsne(out / "sentence_tsne.png"))
        except ImportError as error:  # tformer.optional.MissingDependency is an ImportError
            if not args.allow_missing:
                raise
            missing.append(f"sentence_tsne.png: {error}")
    finally:
        if temporary is not None:
            temporary.cleanup()
    for line in missing:
        print(f"skipped {line}", file=sys.stderr)
    print(f"figures in {out}: {sorted(p.name for p in out.glob('*.png'))}")
    return 0


def _timed(what: str, work) -> None:
    start = time.perf_counter()
    work()
    print(f"[make_figures] {what}: {time.perf_counter() - start:.1f} s", file=sys.stderr)


def lm_figures(work: Path, out: Path, steps: int) -> None:
    from tformer.cli.train import main as train
    from tformer.cli.visualize import main as visualize

    run = work / "lm"
    train(["--config", "ds.json", *_sets(SMALL_LM), "--set", f"run.steps={steps}",
           "--set", f"run.eval_interval={max(steps // 6, 10)}", "--set", f"run.out_dir={json.dumps(str(run))}"])
    visualize(["attention", "--checkpoint", str(run), "--text", "ROMEO: But soft, what light",
               "--out", str(out / "attention.png")])
    visualize(["curves", str(run), "--out", str(out / "training_curves.png")])
    visualize(["gradients", str(run), "--out", str(out / "gradient_flow.png")])


def ablation_figures(work: Path, out: Path, steps: int) -> None:
    from tformer.cli.ablate import main as ablate

    grid_dir = work / "ablation"
    grid = {
        "description": "Character LM on Tiny Shakespeare (2 layers, d 64, T 64, batch 16), one seed: "
                       "the positional encoding varied against learned positions.",
        "base": "ds.json",
        "set": [*SMALL_LM, "model.positional=learned", "run.export=false", "run.eval_interval=40"],
        "seeds": [1],
        "budget": {"steps": steps},
        "out_dir": str(grid_dir),
        "axes": [{"name": "positional", "key": "model.positional", "values": ["none", "learned", "rope"]}],
    }
    grid_file = work / "ablation_grid.json"
    grid_file.parent.mkdir(parents=True, exist_ok=True)
    grid_file.write_text(json.dumps(grid, indent=2))
    ablate(["--config", str(grid_file)])
    shutil.copyfile(grid_dir / "plots" / "final_val_loss.png", out / "ablation.png")
    shutil.copyfile(grid_dir / "plots" / "curves_positional.png", out / "ablation_curves.png")


def sentence_tsne(path: Path) -> None:
    from tformer.models import SentenceEncoder
    from tformer.visualization.embeddings import plot_embeddings, tsne_2d

    encoder = SentenceEncoder.from_pretrained("all-MiniLM-L6-v2", pooling="mean", normalize=True,
                                              backend="reference")
    sentences = [s for group in TOPICS.values() for s in group]
    labels = [topic for topic, group in TOPICS.items() for _ in group]
    embeddings = encoder.encode(sentences).numpy()
    plot_embeddings(tsne_2d(embeddings, seed=0, perplexity=10.0), labels, path, width=6.0, height=5.0,
                    title="t-SNE of all-MiniLM-L6-v2 sentence embeddings (SentenceEncoder)")


def _sets(overrides: list[str]) -> list[str]:
    return [part for override in overrides for part in ("--set", override)]


if __name__ == "__main__":
    sys.exit(main())
