"""Continuing the shipped world: the UNet's (and text encoder's) training state leaves the build folder and comes back
bit for bit, with every finished stage taken from the shipped assets."""

import json

import torch
from safetensors.torch import save_file

from conceptguard.world.build import export_unet_state, seed_build_from_shipped


def _fake_assets(root):
    for folder in ("pipeline/tokenizer", "pipeline/vae", "pipeline/unet", "pipeline/text_encoder", "clip", "detector"):
        (root / folder).mkdir(parents=True)
        (root / folder / "config.json").write_text(json.dumps({"folder": folder}))
    return root


def test_unet_state_round_trips_through_the_repository(tmp_path):
    torch.manual_seed(0)
    weights = {"conv.weight": torch.randn(4, 3), "conv.bias": torch.randn(4)}
    ema = {k: v + 0.5 for k, v in weights.items()}
    optimizer = {"state": {i: {"step": torch.tensor(7.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
                           for i, v in enumerate(weights.values())},
                 "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "weight_decay": 0.01, "params": [0, 1]}]}
    generator = torch.Generator().manual_seed(3).get_state()
    build = tmp_path / "build"
    (build / "unet.work").mkdir(parents=True)
    text = {"embed.weight": torch.randn(5, 2), "position_ids": torch.arange(3)}  # an integer buffer too
    text_ema = {"embed.weight": text["embed.weight"] - 1, "position_ids": text["position_ids"]}
    text_optimizer = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.randn(5, 2), "exp_avg_sq": torch.rand(5, 2)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "params": [0]}]}
    torch.save({"unet": weights, "ema": ema, "optimizer": optimizer, "generator": generator, "step": 7,
                "text_encoder": text, "text_ema": text_ema, "text_optimizer": text_optimizer},
               build / "unet.work" / "checkpoint.pt")
    assets = _fake_assets(tmp_path / "assets")
    save_file(ema, assets / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    save_file(text_ema, assets / "pipeline" / "text_encoder" / "model.safetensors")

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "adam_exp_avg.safetensors").write_bytes(b"an older export's file")
    state_dir = export_unet_state(build, tmp_path / "state")
    assert not (state_dir / "adam_exp_avg.safetensors").exists()
    step = seed_build_from_shipped(tmp_path / "again", assets, state_dir)

    assert step == 7
    restored = torch.load(tmp_path / "again" / "unet.work" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(restored["unet"][k], weights[k]) for k in weights)
    assert all(torch.equal(restored["ema"][k], ema[k]) for k in ema)
    for i, original in optimizer["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(restored["optimizer"]["state"][i][key], original[key])
        assert float(restored["optimizer"]["state"][i]["step"]) == 7.0
    assert restored["optimizer"]["param_groups"][0]["lr"] == 3e-4
    assert torch.equal(restored["generator"], generator)
    assert all(torch.equal(restored["text_encoder"][k], text[k]) for k in text)
    assert all(torch.equal(restored["text_ema"][k], text_ema[k]) for k in text_ema)
    assert torch.equal(restored["text_optimizer"]["state"][0]["exp_avg"], text_optimizer["state"][0]["exp_avg"])
    assert restored["text_optimizer"]["param_groups"][0]["lr"] == 1e-3
    # Finished stages come from the assets, marked done so the build skips them.
    for stage in ("tokenizer", "vae", "clip", "detector"):
        assert (tmp_path / "again" / stage / "DONE").is_file()
        assert (tmp_path / "again" / stage / "config.json").is_file()


def test_a_tuned_shipped_detector_seeds_the_tune_stage(tmp_path):
    """The shipped detector is the detector_tune stage's output when its config records tuning steps; the base
    stage is then not needed (and not retrained) by a build continued from the shipped assets."""
    from conceptguard.world.build import BuildConfig, build_detector

    assets = _fake_assets(tmp_path / "assets")
    (assets / "detector" / "config.json").write_text(json.dumps({"width": 32, "tune_steps": 500}))
    save_file({"w": torch.zeros(1)}, assets / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    state = tmp_path / "state"
    state.mkdir()
    meta = {"unet": {"adam_steps": [], "param_groups": [], "param_order": []}, "step": 3,
            "generator": torch.Generator().manual_seed(0).get_state().tolist()}
    for name in ("raw", "exp_avg", "exp_avg_sq"):
        save_file({}, state / f"unet_{name}.safetensors")
    (state / "state.json").write_text(json.dumps(meta))
    seed_build_from_shipped(tmp_path / "again", assets, state)
    assert (tmp_path / "again" / "detector_tune" / "DONE").is_file()
    assert not (tmp_path / "again" / "detector").exists()
    assert sum(p["steps"] for p in BuildConfig().detector_tune) > 0

    from conceptguard.world.models import Detector

    detector = Detector()
    save_file(detector.state_dict(), tmp_path / "again" / "detector_tune" / "model.safetensors")
    loaded = build_detector(tmp_path / "again", BuildConfig(), vae=None)  # no base training: vae unused
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), detector.state_dict().values()))
