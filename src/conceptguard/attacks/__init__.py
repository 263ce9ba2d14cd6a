"""Red-teaming: attacks that try to bring an erased (or never learned) concept back.

- :mod:`~conceptguard.attacks.relearn` — re-learning from the attacker's images: full fine-tuning,
  LoRA, DreamBooth, Textual Inversion and Custom Diffusion, as recipes on the shared training loop;
- :mod:`~conceptguard.attacks.prompt_attacks` — adversarial prompts: UnlearnDiffAtk and P4D;
- :mod:`~conceptguard.attacks.curves` — recovery curves (detection at checkpoints), the attack
  success rate and the ``attack.json`` that ``conceptguard report`` reads;
- :mod:`~conceptguard.attacks.tokens` — the token-embedding surgery both kinds share.

    from conceptguard.attacks import RelearnConfig, relearn_attack
    result, record = relearn_attack(pipe, "drennik/", "drennik", "runs/lora",
                                    config=RelearnConfig(kind="lora"), checkpoints=[0, 50, 100, 200])

Names are imported on first use, so importing the package stays cheap.
"""

from __future__ import annotations

from conceptguard._lazy import lazy_exports

_EXPORTS = {
    "KINDS": "conceptguard.attacks.relearn",
    "KIND_DEFAULTS": "conceptguard.attacks.relearn",
    "RelearnConfig": "conceptguard.attacks.relearn",
    "RelearnResult": "conceptguard.attacks.relearn",
    "default_train_config": "conceptguard.attacks.relearn",
    "relearn": "conceptguard.attacks.relearn",
    "relearn_attack": "conceptguard.attacks.relearn",
    "METHOD_DEFAULTS": "conceptguard.attacks.prompt_attacks",
    "PromptAttackConfig": "conceptguard.attacks.prompt_attacks",
    "AdversarialPrompt": "conceptguard.attacks.prompt_attacks",
    "optimise_prompt": "conceptguard.attacks.prompt_attacks",
    "prompt_attack": "conceptguard.attacks.prompt_attacks",
    "run_prompt_attack": "conceptguard.attacks.prompt_attacks",
    "CurvePoint": "conceptguard.attacks.curves",
    "CurveRecorder": "conceptguard.attacks.curves",
    "EvalPrompt": "conceptguard.attacks.curves",
    "GenerationSettings": "conceptguard.attacks.curves",
    "detector_for": "conceptguard.attacks.curves",
    "world_detector": "conceptguard.attacks.curves",
    "world_prompts": "conceptguard.attacks.curves",
    "write_attack_outputs": "conceptguard.attacks.curves",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, globals())
