"""The presets the real-host recipes (tests/real_hosts/) train with: each loads, and each flow one
binds to the model its recipe runs it on. Those runs take a machine and an hour, so a preset that a
change of sdplug no longer accepts must fail here first."""

from __future__ import annotations

from pathlib import Path

import pytest

import sdplug
from sdplug.hosts.diffusers_scripts import flow_edits
from sdplug.hosts.diffusers_scripts.flow_session import MODEL_PATCH as DIFFUSERS_PATCH
from sdplug.hosts.diffusers_scripts.flow_session import TEXT_ENCODERS as DIFFUSERS_ENCODERS
from sdplug.hosts.kohya.flow_flags import MODEL_PATCH as KOHYA_PATCH
from sdplug.hosts.kohya.flow_flags import TEXT_ENCODERS as KOHYA_ENCODERS
from sdplug.process import Flow, flow_sigmas

RECIPES = Path(__file__).resolve().parents[1] / "real_hosts"

# preset -> the scripts its recipe runs it with (rebuild_flow.sh's preset_for)
KOHYA_FLOW = {
    "flow_preset.toml": ("flux_train_network.py", "sd3_train_network.py"),
    "flow_preset_one_encoder.toml": ("lumina_train_network.py", "anima_train_network.py"),
    "flow_preset_hunyuan.toml": ("hunyuan_image_train_network.py",),
}
DIFFUSERS_FLOW = {
    "flow_preset.toml": (flow_edits.FLUX2, flow_edits.QWEN_IMAGE, flow_edits.Z_IMAGE, flow_edits.LUMINA2),
    "flow_preset_two_encoders.toml": (flow_edits.FLUX, flow_edits.SD3),
}


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.toml")), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_preset_loads(path):
    assert sdplug.load_preset(path).name


@pytest.mark.parametrize(
    ("folder", "name", "script", "patch", "encoders"),
    [("kohya", name, s, KOHYA_PATCH[s], KOHYA_ENCODERS[s]) for name, scripts in KOHYA_FLOW.items() for s in scripts]
    + [
        ("diffusers", name, s, DIFFUSERS_PATCH[s], DIFFUSERS_ENCODERS[s])
        for name, scripts in DIFFUSERS_FLOW.items()
        for s in scripts
    ],
)
def test_each_flow_recipe_preset_binds_to_its_scripts_model(folder, name, script, patch, encoders):
    """Its caption dropouts name that script's encoders, and its dynamic shift counts that model's
    patches (a preset writing FLUX's patch_size = 2 is refused on HunyuanImage-2.1's 1x1 ones)."""
    preset = sdplug.load_preset(RECIPES / folder / name)
    plan = preset.build(process=Flow(flow_sigmas(1000), patch_size=patch), seed=0, text_encoders=encoders)
    assert plan.process.dynamic is not None and plan.process.dynamic.patch_size == patch
