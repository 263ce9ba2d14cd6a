"""FreezeAsGuard: learn which UNet tensors to freeze so that fine-tuning cannot teach an illegal
domain, store that choice as a verifiable mask file, and enforce it when fine-tuning.

    from conceptguard.guard import GuardConfig, learn_mask
    result = learn_mask(pipe, "data/illegal", "data/logos", "runs/guard", config=GuardConfig(ratio=0.3))
    result.mask.save("guard.safetensors")

    from conceptguard.finetune import finetune
    finetune(pipe, "data/user", "runs/user", guard="guard.safetensors")   # masked tensors stay frozen
"""

from conceptguard.guard.mask import (
    GuardConfig,
    MaskedWeights,
    MaskLearningRecipe,
    MaskLearningResult,
    guard_train_config,
    learn_mask,
    mask_objective,
)
from conceptguard.guard.maskfile import (
    GuardMask,
    build_manifest,
    describe_data,
    exact_count,
    load_mask,
    random_frozen,
    random_mask,
    top_k_frozen,
)

__all__ = [
    "GuardConfig",
    "GuardMask",
    "MaskLearningRecipe",
    "MaskLearningResult",
    "MaskedWeights",
    "build_manifest",
    "describe_data",
    "exact_count",
    "guard_train_config",
    "learn_mask",
    "load_mask",
    "mask_objective",
    "random_frozen",
    "random_mask",
    "top_k_frozen",
]
