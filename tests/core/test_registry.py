"""The registry: uniqueness, unknown names, and plugins through (faked) entry points."""

from dataclasses import dataclass

import pytest

import sdplug
from sdplug.errors import DuplicateStrategyError, PluginError, UnknownStrategyError
from sdplug.strategies import BUILTINS, FAMILIES, build_registries
from sdplug.strategies.base import NoiseStrategy


class DoubledNoise(NoiseStrategy):
    """Twice the noise so far (a test plugin)."""

    def transform(self, noise, latents, generator):
        import torch

        base = torch.randn(latents.shape, generator=generator) if noise is None else noise
        return 2 * base


@dataclass
class FakeDistribution:
    name: str


class FakeEntryPoint:
    def __init__(self, name, target, dist="sdplug-extra-noise", value="sdplug_extra:Doubled"):
        self.name, self._target, self.dist, self.value = name, target, FakeDistribution(dist), value
        self.loads = 0

    def load(self):
        self.loads += 1
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def registries_with(*entry_points):
    return build_registries(entry_points=lambda group: list(entry_points) if group == "sdplug.noise" else [])


def test_every_family_has_its_builtins():
    for family in FAMILIES:
        assert set(BUILTINS[family]) <= set(sdplug.available(family))


def test_registering_a_name_twice_is_an_error():
    noise = registries_with()["noise"]
    with pytest.raises(DuplicateStrategyError, match="already registered"):
        noise.register("offset", DoubledNoise)


def test_unknown_name_lists_available_and_suggests_closest():
    with pytest.raises(UnknownStrategyError) as info:
        sdplug.create("noise", "pyramd")
    message = str(info.value)
    assert "Available names: gaussian, generalized_offset, immiscible" in message
    assert "Did you mean 'pyramid'?" in message


def test_unknown_family_lists_families():
    with pytest.raises(UnknownStrategyError, match="loss_weighting"):
        sdplug.available("losses")


def test_plugin_is_discovered_lazily_and_records_its_distribution():
    ep = FakeEntryPoint("doubled", DoubledNoise)
    noise = registries_with(ep)["noise"]
    assert "doubled" in noise.names()
    assert ep.loads == 0  # listed from metadata, not imported
    entry = noise.get("doubled")
    assert ep.loads == 1
    assert entry.origin == "sdplug-extra-noise"
    assert entry.description == "Twice the noise so far (a test plugin)."
    assert isinstance(noise.create("doubled"), DoubledNoise)


def test_plugin_cannot_shadow_a_builtin():
    noise = registries_with(FakeEntryPoint("pyramid", DoubledNoise))["noise"]
    with pytest.raises(DuplicateStrategyError, match="sdplug-extra-noise.*'pyramid'"):
        noise.names()


def test_two_plugins_with_one_name_conflict():
    noise = registries_with(FakeEntryPoint("doubled", DoubledNoise), FakeEntryPoint("doubled", DoubledNoise, dist="other"))[
        "noise"
    ]
    with pytest.raises(DuplicateStrategyError, match="other"):
        noise.names()


def test_plugin_of_the_wrong_kind_is_refused_with_its_name():
    noise = registries_with(FakeEntryPoint("notnoise", object))["noise"]
    with pytest.raises(PluginError, match="sdplug-extra-noise.*'notnoise'.*NoiseStrategy"):
        noise.get("notnoise")


def test_plugin_that_fails_to_import_names_itself():
    noise = registries_with(FakeEntryPoint("broken", ImportError("no module named sdplug_extra")))["noise"]
    with pytest.raises(PluginError, match="sdplug-extra-noise failed to load noise strategy 'broken'"):
        noise.get("broken")


def test_import_sdplug_does_not_import_optional_packages():
    import subprocess
    import sys

    code = "import sys, sdplug; print('bitsandbytes' in sys.modules, 'xformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
