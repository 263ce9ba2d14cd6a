"""Fine-tune a model's UNet on a folder of images with captions (text-to-image objective).

The data folder holds images with a caption each: a metadata.jsonl (file_name, text) or a .txt
file beside each image. Writes OUT/pipeline (a diffusers folder), OUT/delta.safetensors (the changed
tensors only) and OUT/README.md; checkpoints and logs go to the run folder and --resume continues.
"""

from __future__ import annotations

from conceptguard.commands.common import (
    add_config_file_argument,
    add_model_arguments,
    add_run_arguments,
    run_dir_for,
    split_config_file,
)
from conceptguard.config import add_dataclass_arguments


def add_arguments(parser) -> None:
    from conceptguard.finetune import FinetuneConfig
    from conceptguard.training.loop import TrainConfig

    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="folder of images with captions")
    add_run_arguments(parser)
    add_config_file_argument(parser)
    add_dataclass_arguments(parser.add_argument_group("what to train"), FinetuneConfig)
    add_dataclass_arguments(parser.add_argument_group("optimization"), TrainConfig)


def run(args) -> int:
    from pathlib import Path

    import torch

    from conceptguard.config import build_config, config_to_dict
    from conceptguard.finetune import FinetuneConfig, finetune
    from conceptguard.models.io import content_hash, load_pipeline
    from conceptguard.models.params import select_parameters
    from conceptguard.outputs import _check_output_target, save_method_outputs
    from conceptguard.training.loop import TrainConfig

    values = split_config_file(args, {"finetune": FinetuneConfig, "train": TrainConfig})
    config = build_config(FinetuneConfig, cli_values=values["finetune"])
    train_config = build_config(TrainConfig, cli_values=values["train"])
    _check_output_target(Path(args.out).absolute(), args.overwrite)  # fail before hours of training
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)
    base_hash = content_hash(pipe)
    selected = select_parameters(pipe.unet, config.preset, include=config.include, exclude=config.exclude)
    before = {name: p.detach().clone() for name, p in selected.items()}
    resolved = {"model": str(args.model), "base_model_hash": base_hash, "finetune": config_to_dict(config)}
    result = finetune(pipe, args.data, run_dir_for(args), config=config, train_config=train_config,
                      resume=args.resume, resolved_config=resolved)
    changed = {f"unet.{name}": p.detach() for name, p in selected.items() if not torch.equal(p, before[name])}
    resolved["train"] = config_to_dict(train_config)
    out = save_method_outputs(pipe, args.out, base_pipe_hash=base_hash, changed=changed, method="finetune",
                              config=resolved, overwrite=args.overwrite,
                              summary=f"Fine-tuned {len(changed)} UNet tensors for {result.steps_done} steps on "
                                      f"the images in `{args.data}`.")
    print(f"wrote {out} (final loss {result.final_loss:.4f}; run folder {result.run_dir})")
    return 0
