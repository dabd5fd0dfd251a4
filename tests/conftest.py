import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def sd_alphas():
    from sdplug.schedule import scaled_linear_alphas_cumprod

    return scaled_linear_alphas_cumprod()


@pytest.fixture
def zero_terminal_alphas(sd_alphas):
    from sdplug.schedule import rescale_zero_terminal_snr

    return rescale_zero_terminal_snr(sd_alphas)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny latent SD 1.x-layout model folder (VAE, UNet, CLIP), as a --model."""
    from tests.tiny_sd import build_pipeline

    directory = tmp_path_factory.mktemp("tiny-sd")
    build_pipeline(directory)
    return directory / "model"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small --data folder of the synthetic shapes (one image per combination)."""
    from sdplug.trainer.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("data"), per_combination=1)
