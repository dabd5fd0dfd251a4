"""Attention strategies swap the processors of a (tiny, config-built) diffusers UNet."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

import sdplug
from sdplug.errors import MissingDependencyError, PresetError, SdplugError
from tests.tiny_sd import build_unet


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_unet(cross_attention_dim=32).eval()


def run(unet):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample


@pytest.mark.parametrize(
    "name,processor", [("sdpa", AttnProcessor2_0), ("default", AttnProcessor), ("sliced", SlicedAttnProcessor)]
)
def test_attention_swaps_every_module_and_keeps_the_math(tiny_unet, name, processor):
    sdplug.create("attention", "default").apply(tiny_unet)
    reference = run(tiny_unet)
    changed = sdplug.create("attention", name).apply(tiny_unet)
    processors = list(tiny_unet.attn_processors.values())
    assert changed == len(processors) > 0
    assert all(isinstance(p, processor) for p in processors)
    assert torch.allclose(run(tiny_unet), reference, atol=1e-5)


def test_xformers_without_cuda_or_package_is_a_clear_error(tiny_unet):
    with pytest.raises(MissingDependencyError, match="xformers"):
        sdplug.create("attention", "xformers").apply(tiny_unet)


def test_model_without_attention_processors_is_refused():
    with pytest.raises(SdplugError, match="attention processors"):
        sdplug.create("attention", "sdpa").apply(torch.nn.Linear(2, 2))


# -- issue 8, item 9: slice sizes are checked against the model they are applied to ---------------
def test_sliced_slice_size_above_the_head_count_names_the_key_and_range(tiny_unet):
    with pytest.raises(PresetError) as info:
        sdplug.create("attention", "sliced", slice_size=9).apply(tiny_unet)  # the tiny UNet has 8 heads
    assert info.value.key == "attention.slice_size"
    assert "more than the 8 attention heads" in str(info.value) and "from 1 to 8, 'auto' or 'max'" in str(info.value)


@pytest.mark.parametrize("slice_size", [8, 3, "max"])
def test_sliced_sizes_up_to_the_head_count_keep_the_math(tiny_unet, slice_size):
    sdplug.create("attention", "default").apply(tiny_unet)
    reference = run(tiny_unet)
    assert sdplug.create("attention", "sliced", slice_size=slice_size).apply(tiny_unet) > 0
    assert torch.allclose(run(tiny_unet), reference, atol=1e-5)


def test_sliced_auto_works_on_one_head_layers():
    # diffusers' "auto" (heads // 2) gives a slice of 0 heads here: a ZeroDivisionError at the first step
    torch.manual_seed(0)
    unet = build_unet(cross_attention_dim=32, attention_head_dim=1).eval()
    sdplug.create("attention", "default").apply(unet)
    reference = run(unet)
    sdplug.create("attention", "sliced").apply(unet)
    assert torch.allclose(run(unet), reference, atol=1e-5)


def test_through_the_plan_a_slice_size_error_names_the_preset_file(tiny_unet):
    from sdplug.plan import bind
    from sdplug.preset import parse_preset
    from sdplug.schedule import scaled_linear_alphas_cumprod

    preset = parse_preset({"attention": {"type": "sliced", "slice_size": 9}}, path="my-preset.toml")
    plan = bind(preset, alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    with pytest.raises(PresetError) as info:
        plan.attention(tiny_unet)
    assert str(info.value).startswith("my-preset.toml: attention.slice_size: ")
