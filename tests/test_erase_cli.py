"""`conceptguard erase`: the three artefacts, plain-diffusers loading, options per method, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptguard.cli import main
from conceptguard.methods import MethodResult, MethodSpec


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "conceptguard", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_esd_writes_pipeline_delta_and_card_that_plain_diffusers_loads(tiny_sd1_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = run_cli("erase", "--method", "esd", "--model", str(tiny_sd1_dir), "--concepts", "a red circle",
                     "--out", "X", "--steps", "3", "--progress", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "X"
    assert (out / "pipeline").is_dir() and (out / "delta.safetensors").is_file() and (out / "README.md").is_file()
    assert "esd" in (out / "README.md").read_text()

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    delta = load_file(out / "delta.safetensors")
    assert delta and all(key.startswith("unet.") and ".attn2." in key for key in delta)
    state = pipe.unet.state_dict()
    for key, value in delta.items():
        assert torch.equal(state[key[len("unet."):]], value)

    run_config = json.loads((tmp_path / "X.run" / "config.json").read_text())
    assert run_config["esd"]["concepts"] == ["a red circle"]
    # The paper's optimizer, with the one flag given on the command line.
    train = run_config["train"]
    assert (train["steps"], train["optimizer"], train["lr"]) == (3, "adam", 1e-5)


def test_an_unknown_method_is_one_error_line_and_writes_nothing(tiny_sd1_dir, tmp_path):
    result = run_cli("erase", "--method", "nope", "--model", str(tiny_sd1_dir), "--concepts", "a", "--out", "X",
                     cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: unknown erase method 'nope'") and "esd" in lines[0] and "sdd" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_methods_and_their_options(capsys):
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    text = capsys.readouterr().out
    for expected in ("esd", "sdd", "--eta", "--ema-decay", "--erase-from", "--steps", "[sdd]"):
        assert expected in text


@pytest.mark.parametrize("argv, message", [
    (["--method", "sdd", "--concepts", "a", "--eta", "2"], "--eta does not apply to --method sdd"),
    (["--method", "esd"], "--concepts is required"),
])
def test_option_errors_exit_2_before_any_work(tiny_sd1_dir, tmp_path, capsys, argv, message):
    code = main(["erase", "--model", str(tiny_sd1_dir), "--out", str(tmp_path / "X"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_config_file_sections_and_flags_merge(tiny_sd1_dir, tmp_path, capsys):
    config = tmp_path / "sdd.yaml"
    config.write_text("sdd:\n  concepts: [a cat, a dog]\n  ema_decay: 0.99\n  ddim_steps: 4\n"
                      "train:\n  steps: 9\n  lr: 2e-4\n")
    code = main(["erase", "--method", "sdd", "--model", str(tiny_sd1_dir), "--out", str(tmp_path / "X"),
                 "--config", str(config), "--steps", "2", "--progress", "false"])
    assert code == 0, capsys.readouterr().err
    run_config = json.loads((tmp_path / "X.run" / "config.json").read_text())
    assert run_config["sdd"]["concepts"] == ["a cat", "a dog"] and run_config["sdd"]["ema_decay"] == 0.99
    train = run_config["train"]
    # File < flag; the paper's recipe fills the rest, its 500 warm-up steps cut to the 2-step run.
    assert (train["steps"], train["lr"], train["optimizer"], train["lr_schedule"], train["warmup_steps"]) == (
        2, 2e-4, "adamw", "cosine", 2)


def test_resume_continues_the_run_folder(tiny_sd1_dir, tmp_path, capsys):
    common = ["erase", "--method", "esd", "--model", str(tiny_sd1_dir), "--concepts", "a cat", "--ddim-steps", "4",
              "--progress", "false", "--checkpoint-every", "1", "--log-every", "1"]
    assert main([*common, "--out", str(tmp_path / "X"), "--run-dir", str(tmp_path / "run"), "--steps", "2"]) == 0
    assert main([*common, "--out", str(tmp_path / "Y"), "--run-dir", str(tmp_path / "run"), "--steps", "3"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "Y"), "--run-dir", str(tmp_path / "run"), "--steps", "3",
                 "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@dataclass
class _ScaleConfig:
    concepts: list[str] = field(default_factory=list, metadata={"help": "concepts"})
    factor: float = field(default=0.5, metadata={"help": "scale of conv_in"})


def _scale_apply(pipe, config, *, run_dir, resume=False):
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(config.factor)
    return MethodResult(changed=["unet.conv_in.weight"], summary=f"scaled conv_in by {config.factor}")


def test_any_registered_erase_method_gets_flags_and_outputs(tiny_sd1_dir, tmp_path, monkeypatch, capsys):
    """The command knows no method by name: one registered now gets its flags, and untrained means no --steps."""
    from conceptguard import methods

    methods.methods()  # load the built-in ones first
    spec = MethodSpec("scale", "erase", _ScaleConfig, _scale_apply, "scale a tensor")
    monkeypatch.setitem(methods._REGISTRY, "scale", spec)
    args = ["erase", "--method", "scale", "--model", str(tiny_sd1_dir), "--concepts", "a", "--factor", "2"]
    assert main([*args, "--out", str(tmp_path / "S"), "--steps", "3"]) == 2
    assert "--steps does not apply to --method scale" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "S")]) == 0
    delta = load_file(tmp_path / "S" / "delta.safetensors")
    assert list(delta) == ["unet.conv_in.weight"]
    assert "scaled conv_in by 2.0" in (tmp_path / "S" / "README.md").read_text()
