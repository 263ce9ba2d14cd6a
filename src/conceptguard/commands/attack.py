"""Red-team a model: re-learning attacks and adversarial prompts, with a recovery curve.

    conceptguard attack --kind lora --data drennik/ --concept drennik --out runs/lora --steps 200 --lr 1e-3
    conceptguard attack --model erased/pipeline --kind ti --data zorblat/ --concept zorblat --out runs/ti
    conceptguard attack --model erased/pipeline --kind prompt --method p4d --original embedded \\
        --concept zorblat --out runs/p4d --steps 100 --checkpoints 0 50 100

Kinds: finetune (full UNet), lora, dreambooth (prior preservation), ti (textual inversion),
custom (Custom Diffusion: attn2 to_k/to_v), prompt (UnlearnDiffAtk or P4D, --method). The target
concept's detection rate is measured at each --checkpoints step on a fixed prompt set (the
world's target prompts of --concept, or --prompts CSV) and written to OUT/attack.json and
OUT/curve.png, which `conceptguard report OUT` reads. Re-learning keeps its training run in
OUT/train; --save-model also writes the attacked model to OUT/model.

Optimizer defaults are each kind's paper recipe for real Stable Diffusion (finetune: Adam 1e-5,
batch 4, 2000 steps; lora: 1e-4, rank 4, 2000; dreambooth: 5e-6, batch 1, 800; ti: 5e-3, batch 4,
3000; custom: 8e-5, batch 8, 250; unlearndiff: 5 tokens, lr 0.01, 40 steps; p4d: 16 tokens,
lr 0.1, 3000 steps). The embedded world's tiny model needs larger learning rates and fewer
steps: see docs/attacks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from conceptguard.commands.common import add_config_file_argument, add_model_arguments, split_config_file
from conceptguard.config import add_dataclass_arguments
from conceptguard.errors import ConceptGuardError

RELEARN_KINDS = ("finetune", "lora", "dreambooth", "ti", "custom")
KINDS = RELEARN_KINDS + ("prompt",)
# Prompt-attack options that share a flag with the optimization group.
_SHARED_PROMPT_FLAGS = ("steps", "lr", "weight_decay", "seed", "batch_size")
# Files this command writes into OUT (removed by --overwrite; nothing else is touched).
_OUTPUTS = ("attack.json", "curve.png", "timing.json", "train", "model", "learned_embeds.safetensors",
            "pytorch_lora_weights.safetensors")


def add_arguments(parser) -> None:
    from conceptguard.attacks.prompt_attacks import PromptAttackConfig
    from conceptguard.attacks.relearn import RelearnConfig
    from conceptguard.training.loop import TrainConfig

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(parser)
    group = parser.add_argument_group("attack")
    group.add_argument("--kind", required=True, choices=KINDS, help="attack to run")
    group.add_argument("--concept", required=True, help="the concept to bring back (a world concept name, e.g. drennik)")
    group.add_argument("--out", required=True, help="run folder: attack.json, curve.png, train/, model/")
    group.add_argument("--data", default=None, help="folder of images with captions (metadata.jsonl or .txt files)")
    group.add_argument("--checkpoints", nargs="+", type=int, default=None, metavar="STEP",
                       help="steps at which to measure detection (default: 0 50 100 200 500 within the run)")
    group.add_argument("--original", default=None,
                       help="[prompt] the model before erasure (P4D's target; UnlearnDiffAtk's reference images)")
    group.add_argument("--prompts", default=None, metavar="CSV",
                       help="evaluation prompts (prompt, evaluation_seed columns); default: the world's target prompts")
    group.add_argument("--n-prompts", type=int, default=None,
                       help="number of world target prompts (default: 32, prompt attacks 16)")
    group.add_argument("--prompt-seed", type=int, default=0, help="seed of the world's prompt set")
    group.add_argument("--detector", default="auto", choices=("auto", "world", "nudenet"),
                       help="what decides that the concept appears (auto: nudenet for 'nudity', else the world's)")
    group.add_argument("--world-assets", default=None, metavar="DIR",
                       help="embedded-world assets for the detector (default: the installed ones)")
    group.add_argument("--eval-steps", type=int, default=25, help="sampling steps of the evaluation images")
    group.add_argument("--eval-guidance", type=float, default=7.5, help="guidance scale of the evaluation images")
    group.add_argument("--save-model", action="store_true", help="also write the attacked model to OUT/model")
    group.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier attack in OUT")
    add_config_file_argument(parser)
    add_dataclass_arguments(parser.add_argument_group("optimization (re-learning; --steps/--lr/--weight-decay/--seed "
                                                      "also set prompt attacks')"), TrainConfig)
    add_dataclass_arguments(parser.add_argument_group("re-learning (kinds in brackets)"), RelearnConfig, skip=("kind",))
    add_dataclass_arguments(parser.add_argument_group("prompt attacks (--kind prompt)"), PromptAttackConfig,
                            skip=_SHARED_PROMPT_FLAGS)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _refuse_foreign(args, names: set[str], kind: str) -> None:
    given = sorted(name for name in names if getattr(args, name, None) is not None)
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConceptGuardError(f"{flags} {'does' if len(given) == 1 else 'do'} not apply to --kind {kind}; "
                                "see `conceptguard attack --help`")


def _prepare_out(out: Path, overwrite: bool) -> None:
    existing = [name for name in _OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise ConceptGuardError(f"{out} already holds attack outputs ({', '.join(existing)}); "
                                "choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise ConceptGuardError(f"--out {out} exists and is not a folder")
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _prompts(args, default_n: int):
    from conceptguard.attacks import curves

    if args.prompts:
        return curves.csv_prompts(args.prompts)
    if args.n_prompts is not None and args.n_prompts < 1:
        raise ConceptGuardError("--n-prompts must be at least 1")
    try:
        return curves.world_prompts(args.concept, n=args.n_prompts or default_n, seed=args.prompt_seed)
    except ConceptGuardError as exc:
        raise ConceptGuardError(f"{exc}; for other concepts pass --prompts CSV") from None


def _checkpoints(args, steps: int) -> list[int]:
    if args.checkpoints is not None:
        return args.checkpoints
    return sorted({s for s in (0, 50, 100, 200, 500) if s <= steps} | {steps})


def run(args) -> int:
    from conceptguard.attacks.prompt_attacks import PromptAttackConfig
    from conceptguard.attacks.relearn import RelearnConfig
    from conceptguard.training.loop import TrainConfig

    relearn_names = _fields(RelearnConfig) - {"kind"}
    prompt_names = _fields(PromptAttackConfig) - set(_SHARED_PROMPT_FLAGS)
    train_names = _fields(TrainConfig)
    if args.kind == "prompt":
        _refuse_foreign(args, (relearn_names - {"batch_size"}) | (train_names - set(_SHARED_PROMPT_FLAGS)), "prompt")
        return _run_prompt(args)
    _refuse_foreign(args, prompt_names, args.kind)
    if args.original is not None:
        raise ConceptGuardError(f"--original applies to --kind prompt only, not --kind {args.kind}")
    return _run_relearn(args)


def _generation(args):
    from conceptguard.attacks.curves import GenerationSettings

    if args.eval_steps < 1:
        raise ConceptGuardError("--eval-steps must be at least 1")
    return GenerationSettings(num_inference_steps=args.eval_steps, guidance_scale=args.eval_guidance)


def _run_relearn(args) -> int:
    from conceptguard.attacks import curves
    from conceptguard.attacks.relearn import RelearnConfig, default_train_config, relearn_attack
    from conceptguard.config import build_config
    from conceptguard.models.io import content_hash, load_pipeline, model_components
    from conceptguard.outputs import save_method_outputs
    from conceptguard.training.loop import TrainConfig

    if not args.data:
        raise ConceptGuardError(f"--kind {args.kind} needs --data: the folder of images and captions the attacker brings")
    values = split_config_file(args, {"attack": RelearnConfig, "train": TrainConfig})
    config = build_config(RelearnConfig, cli_values={**values["attack"], "kind": args.kind})
    train_config = default_train_config(args.kind, values["train"])
    checkpoints = curves.check_checkpoints(_checkpoints(args, train_config.steps), train_config.steps)
    prompts = _prompts(args, 32)
    detector = curves.detector_for(args.concept, args.detector, assets=args.world_assets)
    settings = _generation(args)
    out = Path(args.out)
    _prepare_out(out, args.overwrite)

    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)
    base_hash = content_hash(pipe)
    result, record = relearn_attack(pipe, args.data, args.concept, out, config=config, train_config=train_config,
                                    checkpoints=checkpoints, prompts=prompts, detector=detector, settings=settings,
                                    model_name=str(args.model), extra_record={"model_hash": base_hash})
    for name, data in result.extra_files.items():
        (out / name).write_bytes(data)
    if args.save_model:
        if args.kind == "lora" and not config.merge:
            raise ConceptGuardError("--save-model needs merged LoRA weights; the adapters are in "
                                    f"{out / 'pytorch_lora_weights.safetensors'}")
        states = {name: module.state_dict() for name, module in model_components(pipe).items()}
        changed = {key: states[key.partition(".")[0]][key.partition(".")[2]] for key in result.trained}
        save_method_outputs(pipe, out / "model", base_pipe_hash=base_hash, changed=changed,
                            method=f"attack-{args.kind}", config=record["config"], summary=result.summary,
                            extra_files=result.extra_files, overwrite=True)
    _print_summary(out, record)
    return 0


def _run_prompt(args) -> int:
    import numpy as np

    from conceptguard.attacks import curves
    from conceptguard.attacks.prompt_attacks import PromptAttackConfig, run_prompt_attack
    from conceptguard.config import build_config
    from conceptguard.models.io import content_hash, load_pipeline

    values = split_config_file(args, {"attack": PromptAttackConfig})
    config = build_config(PromptAttackConfig, cli_values=values["attack"])
    checkpoints = curves.check_checkpoints(
        args.checkpoints if args.checkpoints is not None else (0, config.steps), config.steps)
    if config.method == "p4d" and args.original is None:
        raise ConceptGuardError("--method p4d needs --original: the model before erasure, whose predictions it matches")
    if config.method == "unlearndiff" and args.original is None and not args.data:
        raise ConceptGuardError("--method unlearndiff needs images of the concept: --data FOLDER or --original MODEL")
    prompts = _prompts(args, 16)
    detector = curves.detector_for(args.concept, args.detector, assets=args.world_assets)
    settings = _generation(args)
    out = Path(args.out)
    _prepare_out(out, args.overwrite)

    load = dict(allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)
    pipe = load_pipeline(args.model, **load)
    original = load_pipeline(args.original, **load) if args.original is not None else None
    reference = None
    if args.data and original is None:
        from conceptguard.diffusion import image_size
        from conceptguard.world.dataset import load_folder

        reference = np.stack([image for image, _ in load_folder(args.data, size=image_size(pipe))])
    record = run_prompt_attack(pipe, args.concept, out, config=config, prompts=prompts, detector=detector,
                               original=original, reference_images=reference, checkpoints=checkpoints,
                               settings=settings, model_name=str(args.model),
                               extra_record={"model_hash": content_hash(pipe),
                                             "original": None if args.original is None else str(args.original)})
    _print_summary(out, record)
    return 0


def _print_summary(out: Path, record: dict) -> None:
    asr = record["asr"]
    before = "n/a" if asr["no_attack"] is None else f"{100 * asr['no_attack']:.1f}%"
    print(f"wrote {out / 'attack.json'} and {out / 'curve.png'}: {record['kind']} on {record['concept']!r}, "
          f"detection {before} without attack -> {100 * asr['attack']:.1f}% at step {asr['step']} (n={asr['n']})")
