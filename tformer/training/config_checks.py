"""Checks on a loaded training config beyond key names and types (which :mod:`tformer.schema`
does): every number in its range, no NaN or infinity anywhere, the ``deepspeed`` section
validated by DeepSpeed's own config model, and no key that is set but has no effect.

A key without effect is an error rather than a warning: a user who sets ``data.path`` while
``data.source`` is ``tinyshakespeare`` believes they trained on their file. tformer refuses
(it does not infer ``source='text'`` from a path), and the message says what to set.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from tformer.schema import ConfigError

# This module sits below tformer.training.config (which calls it) and imports nothing from it: the
# ``config`` arguments are TrainConfig instances, named here only in words, so there is no import
# circle, not even one for type checkers.


def check_finite(raw, where: str = "") -> None:
    """No float in the parsed config may be NaN or infinite (JSON's ``NaN``/``Infinity``,
    YAML's ``.nan``/``.inf``, ``--set x=NaN``)."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            check_finite(value, f"{where}{key}.")
    elif isinstance(raw, (list, tuple)):
        for index, value in enumerate(raw):
            check_finite(value, f"{where[:-1]}[{index}].")
    elif isinstance(raw, float) and not math.isfinite(raw):
        raise ConfigError(f"config: {where[:-1]} must be a finite number, got {raw}")


def _at_least(name: str, value, low, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value < low:
        raise ConfigError(f"config: {name} must be >= {low}{' (or null)' if optional else ''}, got {value}")


def check_ranges(config) -> None:
    """Every tformer-section value in its range (the task's sections check their own)."""
    opt, training, run, sample = config.optimizer, config.training, config.run, config.sample
    check_finite(config.to_dict())
    _at_least("optimizer.warmup_steps", opt.warmup_steps, 0)
    _at_least("optimizer.decay_steps", opt.decay_steps, 1, optional=True)
    _at_least("optimizer.weight_decay", opt.weight_decay, 0.0)
    _at_least("optimizer.grad_clip", opt.grad_clip, 0.0)
    if opt.eps <= 0:
        raise ConfigError(f"config: optimizer.eps must be > 0, got {opt.eps}")
    for index, beta in enumerate(opt.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"config: optimizer.betas[{index}] must be in [0, 1), got {beta} (betas={list(opt.betas)})")
    _at_least("training.threads", training.threads, 1, optional=True)
    _at_least("training.seed", training.seed, 0)
    _at_least("run.eval_interval", run.eval_interval, 0)
    _at_least("run.checkpoint_interval", run.checkpoint_interval, 0)
    _at_least("run.keep_checkpoints", run.keep_checkpoints, 0)
    _at_least("run.final_eval_batches", run.final_eval_batches, 1, optional=True)
    if not run.out_dir:
        raise ConfigError("config: run.out_dir must be a folder, got ''")
    _at_least("sample.max_new_tokens", sample.max_new_tokens, 0)
    _at_least("sample.temperature", sample.temperature, 0.0)  # 0: greedy
    _at_least("sample.top_k", sample.top_k, 1, optional=True)
    _at_least("sample.seed", sample.seed, 0)


def _set(raw: dict, section: str, key: str) -> bool:
    """Whether the file or an override gave ``section.key`` a value (null counts as unset)."""
    values = raw.get(section)
    return isinstance(values, dict) and values.get(key) is not None


def _without_defaults(config, raw: dict) -> dict:
    """``raw`` less the keys of each dataclass section whose value is the field's default."""
    def plain(value):
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    kept = {}
    for section, values in raw.items():
        current = getattr(config, section, None)
        if isinstance(values, dict) and dataclasses.is_dataclass(current):
            defaults = {}
            for field in dataclasses.fields(current):
                if field.default is not dataclasses.MISSING:
                    defaults[field.name] = field.default
                elif field.default_factory is not dataclasses.MISSING:
                    defaults[field.name] = field.default_factory()
            values = {key: value for key, value in values.items()
                      if key not in defaults or plain(value) != plain(defaults[key])}
        kept[section] = values
    return kept


def check_effective(config, raw: dict) -> None:
    """Refuse keys that ``raw`` (the parsed file plus overrides) sets but that the other
    settings make ineffective; each message says why and what to set instead. A key at its
    default value is not a setting: a saved config (``TrainConfig.to_dict``) writes every key."""
    raw = _without_defaults(config, raw)
    strategy = config.training.strategy
    deepspeed_on = strategy == "deepspeed" or (strategy == "auto" and config.deepspeed is not None)
    if config.task == "lm":
        source = config.data.source
        if source == "tinyshakespeare" and _set(raw, "data", "path"):
            raise ConfigError(f"config: data.path={config.data.path!r} has no effect with data.source="
                              f"'tinyshakespeare' (the bundled text); set data.source='text' to train on that file")
        if source != "enwik8":
            for key in ("data_dir", "expected_size", "expected_sha1"):
                if _set(raw, "data", key):
                    raise ConfigError(f"config: data.{key} only applies to data.source='enwik8', but data.source="
                                      f"{source!r}; remove data.{key} or set data.source='enwik8'")
        elif _set(raw, "data", "val_fraction"):
            raise ConfigError("config: data.val_fraction has no effect with data.source='enwik8' (its splits are "
                              "fixed: 90M/5M/5M bytes); remove it")
        if config.sample.temperature == 0:
            for key in ("top_k", "seed"):
                if _set(raw, "sample", key):
                    raise ConfigError(f"config: sample.{key} has no effect with sample.temperature=0 (greedy "
                                      f"decoding); remove it or set a temperature > 0")
    elif isinstance(raw.get("sample"), dict):
        extra = sorted(k for k in raw["sample"] if k != "num_samples")
        if extra:
            raise ConfigError(f"config: sample.{extra[0]} has no effect for task {config.task!r} (its samples are the "
                              f"misclassified reviews, not generated text); remove sample.{', sample.'.join(extra)}")
    if config.deepspeed is not None and strategy in ("single", "fsdp2"):
        raise ConfigError(f"config: the deepspeed section has no effect with training.strategy={strategy!r}; remove it "
                          f"(--set deepspeed=null) or set training.strategy='deepspeed' (or 'auto')")
    if raw.get("fsdp") and (deepspeed_on or strategy == "single"):
        raise ConfigError(f"config: the fsdp section has no effect with training.strategy="
                          f"{'deepspeed' if deepspeed_on else strategy!r}; remove it or set training.strategy='fsdp2'")
    if _set(raw, "training", "checkpoint_every") and not config.training.activation_checkpointing:
        raise ConfigError("config: training.checkpoint_every has no effect without training.activation_checkpointing"
                          "=true; set that too, or remove checkpoint_every")
    if config.training.compile and deepspeed_on:
        raise ConfigError("config: training.compile has no effect under DeepSpeed (the engine runs the model "
                          "uncompiled); remove it or use training.strategy='single'/'fsdp2'")
    if _set(raw, "training", "threads") and config.training.device == "cuda":
        raise ConfigError("config: training.threads only applies on the CPU, but training.device='cuda'; remove it")
    if config.optimizer.schedule == "constant":
        for key in ("min_lr", "decay_steps"):
            if _set(raw, "optimizer", key):
                raise ConfigError(f"config: optimizer.{key} has no effect with optimizer.schedule='constant'; "
                                  f"remove it or set optimizer.schedule='cosine'")
    # Not refused: logging.wandb=false beside wandb_* settings. Switching a feature off with its
    # settings still in the file is the usual way to turn it off (--set logging.wandb=false).


class _ReadKeys(dict):
    """A dict that records which keys are read, to learn the top-level keys DeepSpeed knows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set = set()  # shared with the shallow copy DeepSpeedConfig makes

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def check_deepspeed_section(config) -> None:
    """Validate the ``deepspeed`` section with DeepSpeed's own config parser: its pydantic
    models reject unknown or invalid keys inside sections (``stage: 9``, a misspelt ZeRO key),
    and a top-level key DeepSpeed never reads (``zero_optimisation``) is refused by name."""
    if config.deepspeed is None:
        return
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError as error:
        if error.name is not None and error.name.split(".")[0] == "deepspeed":
            return  # DeepSpeed is not installed: the run itself says so, naming the extra
        raise  # a broken DeepSpeed install keeps its own error
    section = {k: v for k, v in config.deepspeed.items() if k != "train_batch_size"}
    section.setdefault("train_micro_batch_size_per_gpu", config.training.micro_batch_size)
    section.setdefault("gradient_accumulation_steps", config.training.grad_accum_steps)
    probe = _ReadKeys(section)
    try:
        DeepSpeedConfig(probe)
    except Exception as error:  # pydantic.ValidationError, AssertionError, ValueError: all DeepSpeed's verdicts
        raise ConfigError(f"config: the deepspeed section is invalid: {_first_line_of(error)}") from None
    unknown = sorted(set(section) - probe.read)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(probe.read), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config: unknown key deepspeed.{unknown[0]!r}: DeepSpeed does not read it.{hint}")


def _first_line_of(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        first = errors()[0]
        location = ".".join(str(part) for part in first.get("loc", ()))
        return f"{getattr(error, 'title', '')}.{location}: {first.get('msg')} (got {first.get('input')!r})"
    return " ".join(str(error).split()) or type(error).__name__
