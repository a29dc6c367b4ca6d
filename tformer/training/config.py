"""The training configuration: one JSON or YAML file, loaded into typed dataclasses.

A file holds tformer's own sections (``task``, ``model``, ``data``, ``optimizer``,
``training``, ``run``, ``sample``, ``logging``, ``fsdp``) and, optionally, a ``deepspeed``
section that is passed to ``deepspeed.initialize`` as DeepSpeed documents it. Every key is
checked: an unknown or mistyped one is an error that names it and suggests the nearest valid
name. ``model`` and ``data`` are checked against the dataclasses of the chosen task (see
:mod:`tformer.tasks.base`), since a classifier and a language model take different keys.

Values are range-checked, NaN/inf refused, the ``deepspeed`` section validated by DeepSpeed's
own config model, and a key set without effect under the other settings refused
(:mod:`tformer.training.config_checks`); YAML errors name the file and line.

``--set section.key=value`` overrides (see :func:`apply_override`) are applied to the parsed
file before it is checked, so an override is held to the same rules as the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tformer.optional import require
from tformer.schema import ConfigError, choices_of, from_dict, given_values
from tformer.training.config_checks import check_deepspeed_section, check_effective, check_finite, check_ranges
from tformer.training.transfer import TransferConfig, check_transfer

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Strategy = Literal["auto", "single", "deepspeed", "fsdp2"]
Device = Literal["auto", "cpu", "cuda"]
WandbMode = Literal["offline", "online", "disabled"]
Schedule = Literal["cosine", "constant"]
# The choices as tuples, for code that lists them; the dataclass fields below are checked by
# tformer.schema.from_dict against their Literal types (one check_choice, one error type).
PRECISIONS, STRATEGIES, DEVICES = choices_of(Precision), choices_of(Strategy), choices_of(Device)
WANDB_MODES, SCHEDULES = choices_of(WandbMode), choices_of(Schedule)


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr`` (Loshchilov and Hutter, 2017/2019).
    Weight decay applies only to parameters with ``>= 2`` dimensions (matmul weights), never to
    norms, biases or embeddings' bias-like vectors (nanoGPT's grouping)."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: decay over run.steps
    schedule: Schedule = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    fused: bool | None = None  # None: fused AdamW where the device supports it (CUDA, CPU)


@dataclass(kw_only=True)
class TrainingConfig:
    """How each step is computed. The global batch is
    ``micro_batch_size * grad_accum_steps * world_size`` sequences."""

    strategy: Strategy = "auto"  # auto: deepspeed if a deepspeed section is present, fsdp2 under torchrun, else single
    micro_batch_size: int = 32
    grad_accum_steps: int = 1
    precision: Precision = "auto"  # auto: bf16 where the GPU supports it, else fp32
    activation_checkpointing: bool = False
    checkpoint_every: int = 1  # checkpoint every k-th block when activation_checkpointing is on
    label_smoothing: float = 0.0
    seed: int = 1337
    compile: bool = False
    device: Device = "auto"  # auto: cuda (this rank's GPU) if available, else cpu
    threads: int | None = None  # torch.set_num_threads on CPU; None leaves torch's default
    # Start from a pretrained run's weights (tformer.init_from): its out_dir, export/ or a checkpoint
    # folder. Every parameter outside the model's `head` must be there; the head starts fresh.
    # Ignored with --resume (the checkpoint holds the weights).
    init_from: str | None = None


DEFAULT_STEPS = 1000


@dataclass(kw_only=True)
class RunConfig:
    """How long to train and what to write. Set ``steps`` or ``epochs``, not both (neither: 1000 steps)."""

    steps: int | None = None  # optimizer steps
    # Passes over the training data (may be fractional), converted to steps by the task
    # (Task.steps_per_epoch: data size / global batch); the progress bar and schedule follow it.
    epochs: float | None = None
    eval_interval: int = 250  # 0: evaluate only at the end
    eval_batches: int = 20  # batches of micro_batch_size windows per evaluation; final eval uses final_eval_batches
    final_eval_batches: int | None = None  # None: the whole validation (and test) split
    log_interval: int = 10
    checkpoint_interval: int = 0  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    # Wall-time budget: stop after the step that crosses it (then evaluate, checkpoint, export as
    # at run.steps). The schedule still decays over run.steps. None: steps only.
    time_limit_s: float | None = None
    export: bool = True  # write model.safetensors + config.json into out_dir/export at the end

    def __post_init__(self):
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(f"config: set exactly one of run.steps and run.epochs, got steps={self.steps} and "
                              f"epochs={self.epochs} (override one with null, e.g. --set run.steps=null)")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"config: run.epochs must be > 0, got {self.epochs}")
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS


@dataclass(kw_only=True)
class SampleConfig:
    """Live samples printed and logged at every evaluation."""

    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy (argmax)
    top_k: int | None = 40
    prompt: str = "\n"
    seed: int = 0


@dataclass(kw_only=True)
class LoggingConfig:
    progress_bar: bool = True
    jsonl: bool = True  # out_dir/metrics.jsonl
    wandb: bool = False
    wandb_mode: WandbMode = "offline"  # WANDB_MODE unless the environment sets it; "online" to upload
    wandb_project: str = "tformer"
    wandb_run_name: str | None = None
    layer_grad_norms: bool = True  # per-layer gradient norms at every log step
    # A warning in the log when a layer's gradient norm (grad_norm/<layer>) falls below / rises
    # above these at a log step; null turns that check off.
    grad_vanish_below: float | None = 1e-7
    grad_explode_above: float | None = 1e3
    visualize: bool = False  # training curves and gradient flow as PNGs in out_dir/plots (and W&B images)


@dataclass(kw_only=True)
class FSDPConfig:
    reshard_after_forward: bool = True


@dataclass(kw_only=True)
class TrainConfig:
    task: str = "lm"
    # The task's own dataclasses (``Task.model_config_class``, ``Task.data_config_class``), built
    # once from the file's ``model`` and ``data`` sections: the model section is the model's config,
    # with the values the data fixes (vocabulary size, sequence length) filled in when the task
    # has read its data (tformer.tasks.model_builder), unless the file sets them.
    model: Any = None
    data: Any = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)  # freezing, unfreezing, layer-wise LRs
    deepspeed: dict | None = None  # passed to deepspeed.initialize (batch, precision, clipping filled in)

    def __post_init__(self):
        from tformer.tasks import get_task_class  # tasks sit below training; imported when first needed

        task_class = get_task_class(self.task)
        try:
            if not dataclasses.is_dataclass(self.data):
                self.data = from_dict(task_class.data_config_class, {} if self.data is None else self.data, "data.")
            if not dataclasses.is_dataclass(self.model):
                self.model = task_class.parse_model_section({} if self.model is None else self.model)
        except ConfigError:
            raise
        except (TypeError, ValueError) as error:  # a model config's own check (ModelConfig: argument ...)
            raise ConfigError(f"config: {error}") from error

    def to_dict(self) -> dict:
        """The config as a file would hold it. ``model`` and ``data`` keep only the keys the file
        set, so reloading it fills the others from the data again."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values = {key: value if key in ("model", "data") else dataclasses.asdict(value)
                  if dataclasses.is_dataclass(value) else value for key, value in values.items()}
        values["model"], values["data"] = given_values(self.model), given_values(self.data)
        return values


# ----------------------------------------------------------------------------- files and overrides

def configs_dir() -> Path:
    """The ready configs: the copy shipped inside an installed package (``tformer/configs``),
    else ``configs/`` at the repository root of a source checkout. The package's own copy is
    tried first: beside an installed package, ``configs/`` is site-packages' (PyPI has a
    ``configs`` package)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "configs", package.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return package.parent / "configs"


def resolve_config_path(name: str) -> Path:
    """A path as given when it exists; otherwise a bare name (``ds.json``, ``zero2``) looked up
    in :func:`configs_dir`, with ``.json``/``.yaml`` tried when no suffix is given."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if path.parent == Path("."):
        folder = configs_dir()
        for candidate in (name, f"{name}.json", f"{name}.yaml", f"{name}.yml"):
            if (folder / candidate).is_file():
                return folder / candidate
        available = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        raise ConfigError(f"config: {name!r} is neither a file nor a config in {folder}; available: {available}")
    raise ConfigError(f"config: file {name!r} does not exist")


def read_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        yaml = require("yaml", f"config: reading {path.name}")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(f"config: {where}: not valid YAML: {' '.join(str(problem).split())}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"config: {path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def parse_value(text: str):
    """An override's value: JSON when it parses (numbers, true/false/null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (``deepspeed.zero_optimization.stage=3`` reaches nested
    dicts) to the parsed file ``raw`` in place. Keys are checked when the result is loaded."""
    if "=" not in assignment:
        raise ConfigError(f"--set: expected section.key=value, got {assignment!r}")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) == 1:
        # Whole-value keys: the task name, and the deepspeed section (null drops it: a DeepSpeed
        # config such as ds.json run as a plain single-process job).
        if parts[0] not in ("task", "deepspeed"):
            raise ConfigError(f"--set: expected section.key=value (or task=NAME, deepspeed=null), got {assignment!r}")
        raw[parts[0]] = parse_value(text)
        return
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"--set: {dotted!r}: {part!r} is not a section")
        node = node[part]
    node[parts[-1]] = parse_value(text)


def load_config(source: str | os.PathLike | dict | None = None, overrides: list[str] | tuple = ()) -> TrainConfig:
    """Read ``source`` (a path, a bare config name or an already parsed dict; None: defaults),
    apply ``overrides``, and check everything, including the task's model and data sections."""
    if source is None:
        raw = {}
    elif isinstance(source, dict):
        raw = json.loads(json.dumps(source))  # a private deep copy
    else:
        raw = read_config_file(resolve_config_path(str(source)))
    for assignment in overrides:
        apply_override(raw, assignment)
    check_finite(raw)
    config = from_dict(TrainConfig, raw)
    check_config(config)
    check_effective(config, raw)
    check_deepspeed_section(config)
    return config


def check_config(config: TrainConfig) -> None:
    # The task's model and data sections were checked when TrainConfig was built.
    check_ranges(config)
    steps = 1 if config.run.steps is None else config.run.steps  # None: run.epochs sets the length
    positives = {"training.micro_batch_size": config.training.micro_batch_size,
                 "training.grad_accum_steps": config.training.grad_accum_steps,
                 "training.checkpoint_every": config.training.checkpoint_every,
                 "run.steps": steps, "run.log_interval": config.run.log_interval,
                 "run.eval_batches": config.run.eval_batches, "sample.num_samples": config.sample.num_samples}
    for name, value in positives.items():
        if value < 1:
            raise ConfigError(f"config: {name} must be >= 1, got {value}")
    if not 0.0 <= config.training.label_smoothing < 1.0:
        raise ConfigError(f"config: training.label_smoothing must be in [0, 1), got {config.training.label_smoothing}")
    if config.optimizer.lr <= 0 or config.optimizer.min_lr < 0 or config.optimizer.min_lr > config.optimizer.lr:
        raise ConfigError(f"config: need 0 <= optimizer.min_lr <= optimizer.lr and lr > 0, got lr="
                          f"{config.optimizer.lr}, min_lr={config.optimizer.min_lr}")
    check_transfer(config)
    if config.run.time_limit_s is not None and config.run.time_limit_s <= 0:
        raise ConfigError(f"config: run.time_limit_s must be > 0 or null, got {config.run.time_limit_s}")
    if config.training.strategy == "deepspeed" and config.deepspeed is None:
        raise ConfigError("config: training.strategy='deepspeed' needs a 'deepspeed' section (it may be {})")
