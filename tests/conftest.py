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
