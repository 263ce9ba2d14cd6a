"""Fine-tune a model's UNet on a folder of images with captions (text-to-image objective).

The data folder holds images with a caption each: a metadata.jsonl (file_name, text) or a .txt
file beside each image. Writes OUT/pipeline (a diffusers folder), OUT/delta.safetensors (the changed
tensors only) and OUT/README.md; checkpoints and logs go to the run folder and --resume continues.

Guarded fine-tuning: --guard MASK (from `conceptguard guard learn`) keeps the mask's tensors frozen
(no gradient, no optimizer state). The mask must be made for this very model (content hash) and
unmodified, and a --preset or --include that selects frozen tensors is refused. --freeze-random
RATIO is the Random-rho baseline (an exact share of tensors, chosen by --freeze-seed).

    conceptguard finetune --data data/mine --guard guard.safetensors --out tuned/
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
    parser.add_argument("--guard", default=None, metavar="MASK",
                        help="FreezeAsGuard mask file: its frozen tensors are not trained")
    add_run_arguments(parser)
    add_config_file_argument(parser)
    add_dataclass_arguments(parser.add_argument_group("what to train"), FinetuneConfig)
    add_dataclass_arguments(parser.add_argument_group("optimization"), TrainConfig)


def run(args) -> int:
    from pathlib import Path

    import torch

    from conceptguard.config import build_config, config_to_dict
    from conceptguard.finetune import FinetuneConfig, finetune, trainable_selection
    from conceptguard.guard.maskfile import load_mask
    from conceptguard.models.io import content_hash, load_pipeline
    from conceptguard.outputs import check_output_target, save_method_outputs
    from conceptguard.training.loop import TrainConfig

    values = split_config_file(args, {"finetune": FinetuneConfig, "train": TrainConfig})
    config = build_config(FinetuneConfig, cli_values=values["finetune"])
    train_config = build_config(TrainConfig, cli_values=values["train"])
    check_output_target(Path(args.out).absolute(), args.overwrite)  # fail before hours of training
    guard = load_mask(args.guard) if args.guard else None  # a damaged mask fails before the model loads
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle, config_dir=args.config_dir, device=args.device)
    base_hash = content_hash(pipe)
    selection = trainable_selection(pipe, config, guard=guard, model_hash=base_hash)
    params = dict(pipe.unet.named_parameters())
    before = {name: params[name].detach().clone() for name in selection.trainable}
    resolved = {"model": str(args.model), "base_model_hash": base_hash, "finetune": config_to_dict(config),
                "guard": selection.guard}
    result = finetune(pipe, args.data, run_dir_for(args), config=config, train_config=train_config, guard=guard,
                      model_hash=base_hash, resume=args.resume, resolved_config=resolved)
    changed = {f"unet.{name}": params[name].detach() for name in selection.trainable
               if not torch.equal(params[name], before[name])}
    resolved["train"] = config_to_dict(train_config)
    out = save_method_outputs(pipe, args.out, base_pipe_hash=base_hash, changed=changed, method="finetune",
                              config=resolved, overwrite=args.overwrite,
                              summary=f"Fine-tuned {len(changed)} UNet tensors for {result.steps_done} steps on "
                                      f"the images in `{args.data}`" + (
                                          f", {len(selection.frozen)} tensors kept frozen" if selection.frozen
                                          else "") + ".")
    print(f"wrote {out} (final loss {result.final_loss:.4f}; run folder {result.run_dir})")
    return 0
