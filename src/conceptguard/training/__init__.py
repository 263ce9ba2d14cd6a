"""The shared training loop: methods provide a :class:`Recipe`, :func:`train` does the rest.

    from conceptguard.training import TrainConfig, train
    result = train(MyRecipe(...), TrainConfig(steps=200, lr=1e-5, mixed_precision="bf16"), "runs/esd")
"""

from conceptguard.training.checkpoint import latest_checkpoint, list_checkpoints, load_trainable_parameters
from conceptguard.training.loop import RESUMABLE_CHANGES, Recipe, TrainConfig, TrainResult, lr_multiplier, train

__all__ = [
    "RESUMABLE_CHANGES",
    "Recipe",
    "TrainConfig",
    "TrainResult",
    "latest_checkpoint",
    "list_checkpoints",
    "load_trainable_parameters",
    "lr_multiplier",
    "train",
]
