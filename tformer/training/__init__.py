"""Training: the loop and everything it needs. The config (:mod:`.config`), the optimizer and
its schedule (:mod:`.optim`), the single-process / DeepSpeed / FSDP2 strategy objects
(:mod:`.strategies`, with :mod:`.parallelize` and :mod:`.strategy`), checkpoints (:mod:`.checkpoint`), logging (:mod:`.metrics_logger`),
starting from another run's weights (:mod:`.init_from`), the trainer (:mod:`.trainer`) and
its command line (:mod:`.cli`, behind ``tformer/train.py``)."""

from .config import ConfigError, TrainConfig, load_config
from .trainer import Trainer

__all__ = ["ConfigError", "TrainConfig", "Trainer", "load_config"]
