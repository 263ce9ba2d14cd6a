"""Bad model inputs fail with one clear line, in the library and through the CLI, leaving nothing behind.

``conceptguard info`` is the vehicle: it loads a model and writes nothing, so any error path of
model loading shows up there exactly as it would in every other command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conceptguard.commands import info
from conceptguard.errors import ConceptGuardError
from conceptguard.models.io import content_hash, load_pipeline, model_components


def _prefixed_state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": t.contiguous() for c, m in model_components(pipe).items() for n, t in m.state_dict().items()}


def missing_path(tmp_path, pipe):
    return tmp_path / "no_such_model"


def empty_folder(tmp_path, pipe):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def truncated_safetensors(tmp_path, pipe):
    path = tmp_path / "model.safetensors"
    save_file(_prefixed_state(pipe), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def ckpt_pickle(tmp_path, pipe):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": _prefixed_state(pipe)}, path)
    return path


def bin_pickle(tmp_path, pipe):
    path = tmp_path / "pytorch_model.bin"
    torch.save(pipe.unet.state_dict(), path)
    return path


def vae_folder(tmp_path, pipe):
    pipe.vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


# (builder, words the message must contain)
BAD_INPUTS = {
    "missing path": (missing_path, "not found"),
    "empty folder": (empty_folder, "is empty"),
    "truncated safetensors": (truncated_safetensors, "truncated"),
    "ckpt pickle": (ckpt_pickle, "--allow-pickle"),
    "bin pickle": (bin_pickle, "--allow-pickle"),
    "vae-only folder": (vae_folder, "AutoencoderKL"),
}


@pytest.fixture(params=list(BAD_INPUTS), ids=list(BAD_INPUTS))
def bad_input(request, tmp_path, tiny_sd1):
    builder, expected = BAD_INPUTS[request.param]
    workdir = tmp_path / "work"
    workdir.mkdir()
    return builder(workdir, tiny_sd1), expected


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "conceptguard", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def info_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    info.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_library_raises_a_one_line_error(bad_input):
    path, expected = bad_input
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(path)
    message = str(exc_info.value)
    assert "\n" not in message and expected in message


def test_info_command_raises_the_same_error(bad_input):
    path, expected = bad_input
    with pytest.raises(ConceptGuardError, match=expected):
        info.run(info_args("--model", str(path)))


def test_cli_prints_one_error_line_exits_non_zero_and_writes_nothing(bad_input, tmp_path):
    path, expected = bad_input
    before = tree_snapshot(tmp_path)
    result = run_cli("info", "--model", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert tree_snapshot(tmp_path) == before


def test_info_describes_a_pipeline_folder(tiny_sd1, tiny_sd1_dir, capsys):
    assert info.run(info_args("--model", str(tiny_sd1_dir))) == 0
    out = capsys.readouterr().out
    assert "family:           sd1" in out and "prediction type:  epsilon" in out
    assert f"sha256:{content_hash(tiny_sd1)}" in out
    unet_params = sum(p.numel() for p in tiny_sd1.unet.parameters())
    assert f"{unet_params:,}" in out


def test_info_loads_a_prefixed_checkpoint_with_a_config(tiny_sd1, tiny_sd1_dir, tmp_path, capsys):
    checkpoint = tmp_path / "model.safetensors"
    save_file(_prefixed_state(tiny_sd1), str(checkpoint))
    assert info.run(info_args("--model", str(checkpoint), "--config-dir", str(tiny_sd1_dir), "--json")) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["family"] == "sd1" and facts["content_hash"] == content_hash(tiny_sd1)


def test_cli_info_succeeds_quietly_and_hashes_like_this_process(tiny_sd1, tiny_sd1_dir, tmp_path):
    result = run_cli("info", "--model", str(tiny_sd1_dir), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    facts = json.loads(result.stdout)
    assert facts["family"] == "sd1" and facts["prediction_type"] == "epsilon"
    assert facts["parameters"]["unet"] == sum(p.numel() for p in tiny_sd1.unet.parameters())
    # Another process, another load: the content hash must not depend on either.
    assert facts["content_hash"] == content_hash(tiny_sd1)
