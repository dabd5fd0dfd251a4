"""Attention strategies swap the processors of a (tiny, config-built) diffusers UNet."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

import sdplug
from sdplug.errors import MissingDependencyError, SdplugError
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
