"""``tformer visualize``: plots of trained models and runs, written as PNG files.

    tformer visualize attention --checkpoint runs/ds --text "ROMEO: But soft" --out attention.png
    tformer visualize curves runs/a runs/b --out curves.png
    tformer visualize gradients runs/ds --out gradient_flow.png
    tformer visualize embeddings --checkpoint runs/imdb --data aclImdb_v1.tar.gz --per-class 200

``--checkpoint`` takes an export folder, a run folder (its ``export/``, else its newest
checkpoint's) or a checkpoint folder. The attention weights come from the reference attention
path whatever backend trained the model.
"""

from __future__ import annotations

import argparse

import torch


def build_parser(prog: str = "tformer visualize") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    attention = commands.add_parser("attention", help="heatmaps of every layer's and head's attention weights")
    attention.add_argument("--checkpoint", required=True, help="export, run or checkpoint folder")
    attention.add_argument("--text", required=True, help="the input text (tokenized by the model's own vocabulary)")
    attention.add_argument("--out", default="attention.png", help="PNG to write (default: attention.png)")

    curves = commands.add_parser("curves", help="training curves of one or more runs, overlaid")
    curves.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl (or the files)")
    curves.add_argument("--out", default="training_curves.png")

    gradients = commands.add_parser("gradients", help="per-layer gradient norms over training (line + box plot)")
    gradients.add_argument("run", help="run folder holding metrics.jsonl (logged with logging.layer_grad_norms)")
    gradients.add_argument("--out", default="gradient_flow.png")

    embeddings = commands.add_parser("embeddings", help="t-SNE of a classifier's pooled encoder states")
    embeddings.add_argument("--checkpoint", required=True, help="a classifier's export, run or checkpoint folder")
    embeddings.add_argument("--data", required=True, help="IMDb: aclImdb_v1.tar.gz or the extracted aclImdb/")
    embeddings.add_argument("--split", default="test", choices=("train", "test"))
    embeddings.add_argument("--per-class", type=int, default=200, help="reviews drawn per label (default: 200)")
    embeddings.add_argument("--seed", type=int, default=0)
    embeddings.add_argument("--out", default="embeddings_tsne.png")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "tformer visualize") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        path = COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(path)
    return 0


def _attention(args) -> str:
    from tformer.visualization.attention import attention_maps, plot_attention
    from tformer.visualization.inspect_model import load_for_inspection, tokenize

    model, metadata = load_for_inspection(args.checkpoint)
    ids, labels = tokenize(metadata, args.text)
    if not ids:
        raise ValueError("argument '--text' is empty after tokenization")
    if getattr(model, "uses_cls", False):
        labels = ["<cls>", *labels]
    from tformer.models.encoder_classifier import EncoderClassifier

    # Encoders (classify, mlm, multitask) run their trunk: a multi-task forward also needs a task
    # name and labels, and a head changes no attention weight.
    forward = model.encode if isinstance(model, EncoderClassifier) else None
    maps = attention_maps(model, torch.tensor([ids], dtype=torch.long), forward=forward)
    return str(plot_attention(maps, labels, args.out, title=args.text if len(args.text) <= 80 else None))


def _curves(args) -> str:
    from pathlib import Path

    from tformer.visualization.curves import plot_training_curves, read_metrics

    runs = {}
    for run in args.runs:
        label = Path(run).name if Path(run).is_dir() else Path(run).parent.name
        runs[label if label not in runs else run] = _some_metrics(run)
    return str(plot_training_curves(runs, args.out))


def _gradients(args) -> str:
    from tformer.visualization.curves import read_metrics
    from tformer.visualization.gradients import plot_gradient_flow

    return str(plot_gradient_flow(_some_metrics(args.run), args.out))


def _some_metrics(run: str) -> list[dict]:
    """The run's metric records; a run with none (an empty metrics.jsonl) is an error, not a blank plot."""
    from tformer.visualization.curves import read_metrics

    records = read_metrics(run)
    if not records:
        raise ValueError(f"{run}: metrics.jsonl holds no metric records yet (nothing to plot)")
    return records


def _embeddings(args) -> str:
    from tformer.data.imdb import balanced_subset, load_imdb
    from tformer.generation.classify import TextClassifier

    from tformer.visualization.embeddings import plot_embeddings, pooled_states, tsne_2d
    from tformer.models.pretrained import find_export

    if args.per_class < 2:
        raise ValueError(f"argument '--per-class' must be >= 2, got {args.per_class}")
    classifier = TextClassifier(find_export(args.checkpoint))
    reviews = load_imdb(args.data, expected_per_class=None)[args.split]
    chosen = balanced_subset(reviews, args.per_class * len(classifier.labels), args.seed)
    ids = classifier.encode(chosen.texts)
    states = pooled_states(classifier.model, ids, classifier.pad_id)
    names = [classifier.labels[int(label)] for label in chosen.labels]
    return str(plot_embeddings(tsne_2d(states, seed=args.seed), names, args.out,
                               title=f"t-SNE of pooled encoder states, IMDb {args.split}"))


COMMANDS = {"attention": _attention, "curves": _curves, "gradients": _gradients, "embeddings": _embeddings}
