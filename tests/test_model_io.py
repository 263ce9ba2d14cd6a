"""Loading pipelines from folders and single files, family detection and content hashing."""

from __future__ import annotations

import json
import shutil
import types

import pytest
import torch
from safetensors.torch import save_file

from conceptguard.errors import ConceptGuardError
from conceptguard.models.io import (
    content_hash,
    detect_family,
    load_pipeline,
    model_components,
    prediction_type,
    read_safetensors_header,
)
from conceptguard.models.tiny import build_tiny_pipeline


def prefixed_state(pipe) -> dict[str, torch.Tensor]:
    """Every weight of ``pipe`` keyed as ``component.name``: the diffusers-prefixed single-file layout."""
    return {f"{component}.{name}": tensor.contiguous()
            for component, module in model_components(pipe).items()
            for name, tensor in module.state_dict().items()}


def assert_one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def test_folder_round_trip_keeps_every_weight(tiny_sd1, tiny_sd1_dir):
    from diffusers import StableDiffusionPipeline

    loaded = load_pipeline(tiny_sd1_dir)
    assert isinstance(loaded, StableDiffusionPipeline)
    assert loaded.safety_checker is None
    assert content_hash(loaded) == content_hash(tiny_sd1)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_folder_round_trip_other_families(family, request, tmp_path):
    pipe = request.getfixturevalue(f"tiny_{family}")
    pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    loaded = load_pipeline(tmp_path / "model")
    assert detect_family(loaded) == family
    assert content_hash(loaded) == content_hash(pipe)


def test_prefixed_safetensors_takes_weights_from_file_and_architecture_from_config(tiny_sd1, tiny_sd1_dir, tmp_path):
    other = build_tiny_pipeline("sd1", seed=1)
    assert content_hash(other) != content_hash(tiny_sd1)
    checkpoint = tmp_path / "model.safetensors"
    save_file(prefixed_state(other), str(checkpoint))

    loaded = load_pipeline(checkpoint, config_dir=tiny_sd1_dir)

    assert content_hash(loaded) == content_hash(other)
    assert detect_family(loaded) == "sd1"


def test_prefixed_safetensors_of_another_architecture_is_refused(tiny_sdxl, tiny_sd1_dir, tmp_path):
    checkpoint = tmp_path / "xl.safetensors"
    save_file(prefixed_state(tiny_sdxl), str(checkpoint))
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(checkpoint, config_dir=tiny_sd1_dir)
    assert "text_encoder_2" in assert_one_line(exc_info)


def test_prefixed_safetensors_missing_a_component_is_refused(tiny_sd1, tiny_sd1_dir, tmp_path):
    state = {k: v for k, v in prefixed_state(tiny_sd1).items() if not k.startswith("vae.")}
    checkpoint = tmp_path / "novae.safetensors"
    save_file(state, str(checkpoint))
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(checkpoint, config_dir=tiny_sd1_dir)
    assert "no weights for vae" in assert_one_line(exc_info)


def test_prefixed_safetensors_with_a_missing_tensor_is_refused(tiny_sd1, tiny_sd1_dir, tmp_path):
    state = prefixed_state(tiny_sd1)
    del state["unet.conv_in.weight"]
    checkpoint = tmp_path / "partial.safetensors"
    save_file(state, str(checkpoint))
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(checkpoint, config_dir=tiny_sd1_dir)
    assert "conv_in.weight" in assert_one_line(exc_info)


def test_pickle_checkpoint_loads_only_when_allowed(tiny_sd1, tiny_sd1_dir, tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": prefixed_state(tiny_sd1)}, checkpoint)
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(checkpoint, config_dir=tiny_sd1_dir)
    assert "--allow-pickle" in assert_one_line(exc_info)

    loaded = load_pipeline(checkpoint, config_dir=tiny_sd1_dir, allow_pickle=True)
    assert content_hash(loaded) == content_hash(tiny_sd1)


def test_pickle_only_folder_loads_only_when_allowed(tiny_sd1, tmp_path):
    folder = tmp_path / "bin_model"
    tiny_sd1.save_pretrained(folder, safe_serialization=False)
    assert list(folder.glob("unet/*.bin")) and not list(folder.glob("unet/*.safetensors"))
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(folder)
    assert "pickle" in assert_one_line(exc_info)

    loaded = load_pipeline(folder, allow_pickle=True)
    assert content_hash(loaded) == content_hash(tiny_sd1)


def test_original_single_file_needs_a_config_offline(tmp_path):
    checkpoint = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(checkpoint))
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(checkpoint)
    assert "--config" in assert_one_line(exc_info)


def test_original_single_file_conversion_errors_are_one_line(tiny_sd1_dir, tmp_path):
    checkpoint = tmp_path / "broken.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(checkpoint))
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(checkpoint, config_dir=tiny_sd1_dir)
    assert str(checkpoint) in assert_one_line(exc_info)


def test_truncated_weights_inside_a_folder_are_reported_by_file(tiny_sd1_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(folder)
    message = assert_one_line(exc_info)
    assert "truncated" in message and str(weights) in message


def test_unsupported_pipeline_class_is_refused(tiny_sd1_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(folder)
    assert "FluxPipeline" in assert_one_line(exc_info)


def test_unet_folder_is_not_a_pipeline(tiny_sd1, tmp_path):
    tiny_sd1.unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ConceptGuardError) as exc_info:
        load_pipeline(tmp_path / "unet")
    assert "UNet2DConditionModel" in assert_one_line(exc_info)


def test_read_safetensors_header_accepts_complete_files_only(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(10.0), "b": torch.ones(3, dtype=torch.bfloat16)}, str(path),
              metadata={"k": "v"})
    header = read_safetensors_header(path)
    assert header["__metadata__"] == {"k": "v"} and header["a"]["shape"] == [10]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ConceptGuardError, match="trailing"):
        read_safetensors_header(path)


# ---------------------------------------------------------------------------------------------
# Identification
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_detect_family(family, request):
    assert detect_family(request.getfixturevalue(f"tiny_{family}")) == family


def test_prediction_type(tiny_sd1, tiny_sd2, tiny_sdxl):
    assert prediction_type(tiny_sd1) == "epsilon"
    assert prediction_type(tiny_sd2) == "v_prediction"
    assert prediction_type(tiny_sdxl) == "epsilon"


def test_sd2_is_recognised_by_its_1024_wide_text_conditioning(tiny_sd1):
    unet = types.SimpleNamespace(config={"cross_attention_dim": 1024, "use_linear_projection": False})
    fake = types.SimpleNamespace(unet=unet, vae=object(), text_encoder=tiny_sd1.text_encoder, text_encoder_2=None)
    assert detect_family(fake) == "sd2"


def test_detect_family_refuses_pipelines_without_a_cross_attention_unet():
    with pytest.raises(ConceptGuardError, match="unsupported model"):
        detect_family(types.SimpleNamespace(unet=None, vae=None, text_encoder=None))


def test_unknown_tiny_family_is_refused():
    with pytest.raises(ConceptGuardError, match="unknown model family 'sd3'"):
        build_tiny_pipeline("sd3")


def test_tiny_pipelines_generate_images(tiny_sd1, tiny_sdxl):
    for pipe in (tiny_sd1, tiny_sdxl):
        image = pipe("a photo of a cat", num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        assert image.shape == (1, 16, 16, 3) and image.min() >= 0 and image.max() <= 1


# ---------------------------------------------------------------------------------------------
# Content hash
# ---------------------------------------------------------------------------------------------

def test_content_hash_is_stable_across_loads(tiny_sd1_dir):
    first = content_hash(load_pipeline(tiny_sd1_dir))
    second = content_hash(load_pipeline(tiny_sd1_dir))
    assert first == second
    assert len(first) == 64 and int(first, 16) >= 0


@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae"])
def test_content_hash_changes_with_any_single_weight(component, tiny_sd1_dir):
    pipe = load_pipeline(tiny_sd1_dir)
    before = content_hash(pipe)
    name, param = sorted(getattr(pipe, component).named_parameters())[-1]
    with torch.no_grad():
        param.view(-1)[0] += 1e-3
    assert content_hash(pipe) != before, f"changing {component}.{name} did not change the hash"


def test_content_hash_covers_the_second_text_encoder(tiny_sdxl):
    pipe = build_tiny_pipeline("sdxl")
    assert content_hash(pipe) == content_hash(tiny_sdxl)
    with torch.no_grad():
        pipe.text_encoder_2.text_projection.weight.view(-1)[0] += 1e-3
    assert content_hash(pipe) != content_hash(tiny_sdxl)


def test_content_hash_depends_on_dtype(tiny_sd1_dir):
    pipe = load_pipeline(tiny_sd1_dir)
    assert content_hash(pipe) != content_hash(load_pipeline(tiny_sd1_dir, torch_dtype=torch.bfloat16))
