"""Method outputs: loadable pipeline, exact delta, model card, manifest, and atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import conceptguard.outputs as outputs
from conceptguard.errors import ConceptGuardError
from conceptguard.models.io import content_hash
from conceptguard.models.tiny import build_tiny_pipeline
from conceptguard.outputs import (
    apply_delta,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_delta_metadata,
    save_method_outputs,
    sha256_file,
)

CONFIG = {"concept": "cat", "lr": 1e-5, "steps": 3, "train": ["x"]}
EDITED_UNET = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
               "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight")


def leftovers(parent: Path, name: str) -> list[str]:
    """Hidden temp/old folders that a save into ``parent/name`` may have left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture(scope="module")
def base_hash(tiny_sd1):
    return content_hash(tiny_sd1)


@pytest.fixture
def edited():
    """A fresh copy of the tiny SD1 model with three tensors changed, and those tensors by name."""
    pipe = build_tiny_pipeline("sd1")
    state = {f"{c}.{n}": p for c in ("unet", "text_encoder") for n, p in getattr(pipe, c).named_parameters()}
    # transformers versions differ on a "text_model." prefix, so find the text encoder's name.
    final_norm = next(key for key in state if key.endswith("final_layer_norm.weight"))
    keys = (*EDITED_UNET, final_norm)
    with torch.no_grad():
        for i, key in enumerate(keys):
            state[key].add_(0.5 + i)
    return pipe, {key: state[key].detach().clone() for key in keys}


def save(pipe, changed, out_dir, base_hash, **kwargs):
    return save_method_outputs(pipe, out_dir, base_pipe_hash=base_hash, changed=changed, method="esd",
                               config=CONFIG, summary="Erased the concept 'cat'.", **kwargs)


@pytest.fixture
def saved(edited, base_hash, tmp_path):
    pipe, changed = edited
    return save(pipe, changed, tmp_path / "out", base_hash), pipe, changed


def test_writes_pipeline_delta_card_and_manifest(saved, base_hash):
    out, pipe, _ = saved
    assert (out / "pipeline" / "model_index.json").is_file()
    assert list((out / "pipeline" / "unet").glob("*.safetensors"))
    assert not list(out.rglob("*.bin"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model_hash"] == base_hash and manifest["model_hash"] == content_hash(pipe)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert all(entry["sha256"] == sha256_file(out / name) for name, entry in manifest["files"].items())
    assert leftovers(out.parent, "out") == []


def test_model_card_describes_the_edit(saved, base_hash):
    out, _, changed = saved
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "diffusers"
    assert "conceptguard" in meta["tags"] and "stable-diffusion" in meta["tags"]
    assert meta["base_model_hash"] == f"sha256:{base_hash}" and meta["conceptguard_method"] == "esd"
    assert "Erased the concept 'cat'." in body
    assert "3 tensors" in body
    assert all(key in body for key in changed)
    assert "| `concept` | `cat` |" in body and "| `lr` |" in body
    assert "from_pretrained" in body and "apply_delta" in body


def test_saved_pipeline_loads_with_plain_diffusers_and_draws_the_same_image(saved):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    out, pipe, _ = saved
    reloaded = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    assert isinstance(DiffusionPipeline.from_pretrained(out / "pipeline"), StableDiffusionPipeline)
    assert content_hash(reloaded) == content_hash(pipe)
    images = [p("a photo of a cat", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(7)).images for p in (pipe, reloaded)]
    assert np.abs(images[0] - images[1]).max() < 1e-6


def test_delta_holds_exactly_the_changed_tensors(saved, base_hash):
    out, _, changed = saved
    with safe_open(str(out / "delta.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(changed)
        for key in changed:
            assert torch.equal(handle.get_tensor(key), changed[key])
        metadata = handle.metadata()
    assert metadata["format"] == "conceptguard-delta" and metadata["method"] == "esd"
    assert metadata["base_model_hash"] == base_hash and metadata["conceptguard_version"]
    assert json.loads(metadata["config"]) == CONFIG
    assert read_delta_metadata(out / "delta.safetensors")["config"] == CONFIG


def test_apply_delta_onto_the_base_reproduces_the_edit(saved, base_hash):
    out, pipe, changed = saved
    base = build_tiny_pipeline("sd1")
    assert content_hash(base) == base_hash
    assert apply_delta(base, out / "delta.safetensors") == sorted(changed)
    assert content_hash(base) == content_hash(pipe)


def test_apply_delta_refuses_another_base_and_leaves_it_untouched(saved):
    out, _, _ = saved
    other = build_tiny_pipeline("sd1", seed=1)
    before = content_hash(other)
    with pytest.raises(ConceptGuardError) as exc_info:
        apply_delta(other, out / "delta.safetensors")
    assert "was made for base model" in str(exc_info.value) and "\n" not in str(exc_info.value)
    assert content_hash(other) == before


def test_read_delta_metadata_refuses_other_safetensors(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(ConceptGuardError, match="not a conceptguard delta"):
        read_delta_metadata(path)


def test_changed_tensors_must_be_the_pipelines_weights(edited, base_hash, tmp_path):
    pipe, changed = edited
    wrong = dict(changed)
    wrong[EDITED_UNET[0]] = wrong[EDITED_UNET[0]] + 1
    with pytest.raises(ValueError, match="differs"):
        save(pipe, wrong, tmp_path / "out", base_hash)
    with pytest.raises(ValueError, match="prefixed"):
        save(pipe, {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, tmp_path / "out", base_hash)
    assert list(tmp_path.iterdir()) == []


def test_crash_mid_save_leaves_nothing_behind(edited, base_hash, tmp_path, monkeypatch):
    pipe, changed = edited

    def crash(*args, **kwargs):
        raise RuntimeError("injected crash")

    # The pipeline folder is already written when the delta is.
    monkeypatch.setattr(outputs, "_write_delta", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        save(pipe, changed, tmp_path / "out", base_hash)
    assert list(tmp_path.iterdir()) == []


def test_disk_error_mid_save_is_a_clean_one_line_error(edited, base_hash, tmp_path, monkeypatch):
    pipe, changed = edited

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "_write_delta", no_space)
    with pytest.raises(ConceptGuardError, match="No space left on device"):
        save(pipe, changed, tmp_path / "out", base_hash)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_before_any_work(edited, base_hash, tmp_path, monkeypatch):
    pipe, changed = edited
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    monkeypatch.setattr(type(pipe), "save_pretrained", lambda *a, **k: pytest.fail("saved despite the error"))
    with pytest.raises(ConceptGuardError, match="already exists"):
        save(pipe, changed, out, base_hash)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_the_old_output_completely(edited, base_hash, tmp_path):
    pipe, changed = edited
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save(pipe, changed, out, base_hash, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "delta.safetensors").is_file()
    assert leftovers(tmp_path, "out") == []


def test_crash_while_overwriting_keeps_the_old_output(edited, base_hash, tmp_path, monkeypatch):
    pipe, changed = edited
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    monkeypatch.setattr(outputs, "_write_delta", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        save(pipe, changed, out, base_hash, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path, "out") == []


def test_extra_files_are_written_and_listed(edited, base_hash, tmp_path):
    pipe, changed = edited
    out = save(pipe, changed, tmp_path / "out", base_hash, extra_files={"masks/guard.json": b"{}"})
    assert (out / "masks" / "guard.json").read_bytes() == b"{}"
    assert "masks/guard.json" in json.loads((out / "manifest.json").read_text())["files"]
    with pytest.raises(ValueError):
        save(pipe, changed, tmp_path / "out2", base_hash, extra_files={"../escape": b""})


def test_output_under_a_regular_file_is_refused(edited, base_hash, tmp_path):
    pipe, changed = edited
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    for target in (blocker / "out", blocker / "deeper" / "out"):
        with pytest.raises(ConceptGuardError) as exc_info:
            save(pipe, changed, target, base_hash)
        assert "\n" not in str(exc_info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["not_a_folder"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_parent_is_refused(edited, base_hash, tmp_path):
    pipe, changed = edited
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ConceptGuardError, match="not writable"):
            save(pipe, changed, parent / "out", base_hash)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_non_writable_parent_is_refused_before_any_work(edited, base_hash, tmp_path, monkeypatch):
    # The up-front check, exercised whatever the user (root passes real permission checks).
    pipe, changed = edited
    real_access = os.access
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    monkeypatch.setattr(type(pipe), "save_pretrained", lambda *a, **k: pytest.fail("saved despite the error"))
    with pytest.raises(ConceptGuardError, match="not writable"):
        save(pipe, changed, tmp_path / "out", base_hash)
    assert list(tmp_path.iterdir()) == []


def test_permission_error_during_save_is_a_clean_error(edited, base_hash, tmp_path, monkeypatch):
    # Permission bits are not enforced for root, so simulate what a read-only target raises.
    pipe, changed = edited

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(pipe), "save_pretrained", denied)
    with pytest.raises(ConceptGuardError, match="Permission denied"):
        save(pipe, changed, tmp_path / "out", base_hash)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_helpers_replace_whole_files(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "data.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    atomic_write_text(path, "second")
    assert path.read_text() == "second"

    def failing_replace(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    with pytest.raises(ConceptGuardError, match="Input/output error"):
        atomic_write_bytes(path, b"third")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["data.json"]
