"""UNet parameter selection: presets pick exactly the documented tensors, patterns compose."""

from __future__ import annotations

import re

import pytest

from conceptguard.errors import ConceptGuardError
from conceptguard.models.params import PRESETS, count_parameters, freeze_all_but, select_parameters
from conceptguard.models.tiny import build_tiny_pipeline

FAMILIES = ["tiny_sd1", "tiny_sdxl"]


def transformer_blocks(unet) -> list[str]:
    """Module paths of every transformer block (each has one attn1 and one attn2)."""
    return [name for name, module in unet.named_modules() if type(module).__name__ == "BasicTransformerBlock"]


@pytest.fixture(params=FAMILIES)
def unet(request):
    return request.getfixturevalue(request.param).unet


def test_presets_are_documented():
    assert set(PRESETS) == {"x", "x-strict", "u", "all", "imma"}


def test_x_strict_is_exactly_cross_attention_keys_and_values(unet):
    expected = {f"{block}.attn2.{proj}.weight" for block in transformer_blocks(unet) for proj in ("to_k", "to_v")}
    selected = select_parameters(unet, "x-strict")
    assert set(selected) == expected
    assert len(expected) >= 8  # both tiny layouts have several transformer blocks


def test_x_is_all_of_cross_attention(unet):
    selected = select_parameters(unet, "x")
    assert selected and all(".attn2." in name for name in selected)
    for block in transformer_blocks(unet):
        for suffix in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"):
            assert f"{block}.attn2.{suffix}" in selected
    everything_attn2 = {name for name, _ in unet.named_parameters() if ".attn2." in name}
    assert set(selected) == everything_attn2


def test_u_is_everything_but_cross_attention(unet):
    all_names = {name for name, _ in unet.named_parameters()}
    selected = select_parameters(unet, "u")
    assert not any("attn2" in name for name in selected)
    assert set(selected) == all_names - set(select_parameters(unet, "x"))
    assert "conv_in.weight" in selected and "time_embedding.linear_1.weight" in selected
    assert any(".attn1." in name for name in selected)


def test_u_can_leave_time_embedding_and_output_conv_alone(unet):
    selected = select_parameters(unet, "u", exclude_time_and_out=True)
    assert not any(name.startswith(("time_embedding.", "conv_out.")) for name in selected)
    assert "conv_in.weight" in selected and "conv_norm_out.weight" in selected
    assert set(select_parameters(unet, "u")) - set(selected) == {
        name for name, _ in unet.named_parameters() if name.startswith(("time_embedding.", "conv_out."))}


def test_all_is_every_parameter_in_name_order(unet):
    selected = select_parameters(unet, "all")
    assert list(selected) == sorted(name for name, _ in unet.named_parameters())
    assert select_parameters(unet) == selected
    assert count_parameters(selected) == sum(p.numel() for p in unet.parameters())


def test_imma_is_the_attention_projections_of_self_and_cross_attention(unet):
    selected = select_parameters(unet, "imma")
    projection = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")
    assert all(projection.search(name) for name in selected)
    expected = {f"{block}.{attn}.{suffix}" for block in transformer_blocks(unet) for attn in ("attn1", "attn2")
                for suffix in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")}
    assert set(selected) == expected


def test_selection_values_are_the_unets_parameters(tiny_sd1):
    selected = select_parameters(tiny_sd1.unet, "x-strict")
    params = dict(tiny_sd1.unet.named_parameters())
    assert all(selected[name] is params[name] for name in selected)


def test_include_narrows_a_preset_with_a_regex(tiny_sd1):
    selected = select_parameters(tiny_sd1.unet, "x", include=[r"^down_blocks\."])
    assert selected and all(n.startswith("down_blocks.") and ".attn2." in n for n in selected)


def test_glob_patterns_match_whole_names(tiny_sd1):
    selected = select_parameters(tiny_sd1.unet, include=["glob:*attn2.to_k.weight"])
    assert set(selected) == {n for n in select_parameters(tiny_sd1.unet, "x-strict") if ".to_k." in n}
    # A glob must match the whole name: this one has no trailing "*", so nothing ends with ".to_k".
    with pytest.raises(ConceptGuardError, match="matched no parameter"):
        select_parameters(tiny_sd1.unet, include=["glob:*attn2.to_k"])


def test_an_unprefixed_pattern_that_is_not_a_regex_is_a_glob(tiny_sd1):
    selected = select_parameters(tiny_sd1.unet, include=["*attn2.to_v.*"])
    assert set(selected) == {n for n in select_parameters(tiny_sd1.unet, "x-strict") if ".to_v." in n}


def test_exclude_drops_matches(tiny_sd1):
    selected = select_parameters(tiny_sd1.unet, "imma", exclude=[r"\.bias$", "attn1"])
    assert selected and not any(n.endswith(".bias") or ".attn1." in n for n in selected)
    assert set(selected) == set(select_parameters(tiny_sd1.unet, "x", exclude=[r"\.bias$"]))


def test_unknown_preset_lists_the_known_ones(tiny_sd1):
    with pytest.raises(ConceptGuardError) as exc_info:
        select_parameters(tiny_sd1.unet, "xattn")
    message = str(exc_info.value)
    assert "\n" not in message and "'xattn'" in message
    assert all(name in message for name in PRESETS)


def test_empty_selection_is_an_error(tiny_sd1):
    with pytest.raises(ConceptGuardError) as exc_info:
        select_parameters(tiny_sd1.unet, "x", include=["attn1"])
    message = str(exc_info.value)
    assert "\n" not in message and "matched no parameter of the UNet" in message and "'x'" in message


def test_invalid_forced_regex_is_an_error(tiny_sd1):
    with pytest.raises(ConceptGuardError, match="invalid regular expression"):
        select_parameters(tiny_sd1.unet, include=["re:*attn2"])


def test_freeze_all_but_trains_exactly_the_named_parameters():
    unet = build_tiny_pipeline("sd1").unet
    names = list(select_parameters(unet, "x-strict"))
    trainable = freeze_all_but(unet, names)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == set(names)
    params = dict(unet.named_parameters())
    assert [id(p) for p in trainable] == [id(params[n]) for n in sorted(names)]
    with pytest.raises(ConceptGuardError, match="no UNet parameter named 'nope.weight'"):
        freeze_all_but(unet, ["nope.weight"])
