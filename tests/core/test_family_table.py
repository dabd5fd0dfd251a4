"""One table of strategy families, and capabilities a strategy declares (checked when it registers)."""

import ast
import dataclasses
from pathlib import Path

import pytest

import sdplug
from sdplug.errors import PluginError, PresetError
from sdplug.params import strategy_params
from sdplug.preset import Preset, parse_preset
from sdplug.strategies import BUILTINS, FAMILIES, REGISTRIES, build_registries, cached_text_caption_types
from sdplug.strategies.base import CaptionTransform, LossType, NoiseStrategy, OptimizerStrategy
from sdplug.strategies.families import FAMILY_TABLE
from tests.core.test_registry import FakeEntryPoint

CORE = Path(sdplug.__file__).parent
TABLE_FILE = CORE / "strategies" / "families.py"


def registries_with(family, *entry_points):
    return build_registries(entry_points=lambda group: list(entry_points) if group == f"sdplug.{family}" else [])


# -- one table ---------------------------------------------------------------------------------


def _core_files():
    return [p for p in CORE.rglob("*.py") if "hosts" not in p.relative_to(CORE).parts and p != TABLE_FILE]


def test_family_names_are_listed_only_in_the_table():
    """No literal list, tuple, set or dict (keys) in the core, hosts aside, is a list of families
    (three family names or more, and nothing else): presets, audit and checks iterate the table."""
    names = set(FAMILIES)
    found = []
    for path in _core_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                continue
            items = node.keys if isinstance(node, ast.Dict) else node.elts
            strings = {item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)}
            if len(strings & names) >= 3 and strings <= names:
                found.append(f"{path.relative_to(CORE)}:{node.lineno} {sorted(strings)}")
    assert not found, found


def test_timestep_bins_have_one_home():
    assigned = [
        str(path.relative_to(CORE))
        for path in CORE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TIMESTEP_BINS" for t in node.targets)
    ]
    assert assigned == ["plan/audit.py"]


def test_every_family_of_the_table_has_its_builtins_and_its_preset_field():
    assert FAMILIES == tuple(family.name for family in FAMILY_TABLE)
    assert set(BUILTINS) == set(FAMILIES)
    fields = {field.name: field for field in dataclasses.fields(Preset)}
    for family in FAMILY_TABLE:
        assert family.section in fields, family
        assert ("tuple" in str(fields[family.section].type)) == family.many, family
        assert REGISTRIES[family.name].base is family.base


def test_preset_sections_and_audit_families_follow_the_table():
    from sdplug.plan.audit import preset_strategies
    from sdplug.preset.model import LIST_SECTIONS, SECTIONS, SINGLE_SECTIONS

    assert LIST_SECTIONS == ("noise", "caption")
    assert SINGLE_SECTIONS == ("timesteps", "loss", "loss_weighting", "optimizer", "attention")
    assert SECTIONS[: 1 + len(FAMILIES)] == ("preset", *LIST_SECTIONS, *SINGLE_SECTIONS)
    preset = parse_preset({"noise": [{"type": "offset"}], "loss": {"type": "huber"}})
    assert preset_strategies(preset) == {
        "noise": ["offset"],
        "caption": [],
        "timesteps": [],
        "loss": ["huber"],
        "loss_weighting": [],
        "optimizer": [],
        "attention": [],
    }


# -- every family's schedule check -------------------------------------------------------------


@strategy_params
class WindowedLoss(LossType):
    """MSE on timesteps below ``max_t`` only (a test plugin whose parameter is a timestep)."""

    max_t: int = 500

    def elementwise(self, model_pred, target, timesteps, alphas_cumprod):
        return (model_pred - target) ** 2

    def schedule_problem(self, num_train_timesteps):
        if self.max_t >= num_train_timesteps:
            return ("max_t", f"max_t {self.max_t} is past the schedule's {num_train_timesteps} timesteps.")
        return None


def test_a_schedule_problem_of_a_loss_type_is_checked(monkeypatch, sd_alphas):
    """Loss types were left out of the schedule check: a loss plugin's problem went unreported."""
    registries = registries_with("loss", FakeEntryPoint("windowed", WindowedLoss, dist="sdplug-windowed"))
    monkeypatch.setitem(REGISTRIES, "loss", registries["loss"])
    preset = parse_preset({"loss": {"type": "windowed", "max_t": 5000}}, path="windowed.toml")
    with pytest.raises(PresetError, match="max_t 5000 is past") as info:
        preset.build(alphas_cumprod=sd_alphas, prediction_type="epsilon")
    assert (info.value.path, info.value.key) == ("windowed.toml", "loss.max_t")
    preset = parse_preset({"loss": {"type": "windowed", "max_t": 999}})
    assert preset.build(alphas_cumprod=sd_alphas, prediction_type="epsilon").num_train_timesteps == 1000


# -- capabilities declared, checked when a strategy registers ----------------------------------


class NonCallableHook(NoiseStrategy):
    """A noise plugin whose schedule check is not a method."""

    schedule_problem = "max_timestep"  # type: ignore[assignment]

    def transform(self, noise, latents, generator):
        return latents


class WrongRole(NoiseStrategy):
    """A noise plugin with a role no pipeline knows."""

    role = "output"  # type: ignore[assignment]

    def transform(self, noise, latents, generator):
        return latents


class StringFlag(NoiseStrategy):
    """A noise plugin with a flag written as a string."""

    uses_timesteps = "yes"  # type: ignore[assignment]

    def transform(self, noise, latents, generator):
        return latents


class PreparedButTimeless(NoiseStrategy):
    """A noise plugin with a schedule table that no draw would prepare."""

    def prepare(self, alphas_cumprod):
        self.table = alphas_cumprod

    def transform(self, noise, latents, generator):
        return latents


@pytest.mark.parametrize(
    ("cls", "what"),
    [
        (NonCallableHook, "schedule_problem is 'max_timestep', which is not callable"),
        (WrongRole, "role is 'output'; allowed: 'target', 'input'"),
        (StringFlag, "uses_timesteps is 'yes', not true or false"),
        (PreparedButTimeless, "defines prepare but does not declare uses_timesteps = True"),
    ],
)
def test_a_plugin_declaring_a_capability_wrongly_is_refused_naming_it(cls, what):
    registries = registries_with("noise", FakeEntryPoint("odd", cls, dist="sdplug-odd-noise"))
    with pytest.raises(PluginError) as info:
        registries["noise"].get("odd")
    message = str(info.value)
    assert "sdplug-odd-noise" in message and "'odd'" in message and what in message


def test_a_plugin_of_the_wrong_base_class_is_refused_naming_it():
    registries = registries_with("loss", FakeEntryPoint("noisy", NonCallableHook, dist="sdplug-mixup"))
    with pytest.raises(PluginError, match=r"sdplug-mixup's loss strategy 'noisy' .* not a subclass of .*LossType"):
        registries["loss"].get("noisy")


class TextFreeWithoutDecision(CaptionTransform):
    """A caption plugin that says it needs no text but cannot decide a drop."""

    needs_text = False

    def __call__(self, caption, *, epoch=0, rng=None):
        return caption.upper()


@strategy_params
class ForgetfulProdigy(OptimizerStrategy):
    """An optimizer plugin that adapts its step size but has no lr to be given."""

    adapts_step_size = True
    implementation_parameters = ("block_size",)
    beta: float = 0.9


@pytest.mark.parametrize(
    ("family", "cls", "what"),
    [
        ("caption", TextFreeWithoutDecision, "declares needs_text = False but does not define decide, drop_probability"),
        ("optimizer", ForgetfulProdigy, "declares adapts_step_size = True but has no 'lr' parameter"),
        ("optimizer", ForgetfulProdigy, "implementation_parameters names 'block_size', which is not one of its parameters"),
    ],
)
def test_capabilities_declared_together_are_checked(family, cls, what):
    registries = registries_with(family, FakeEntryPoint("odd", cls, dist="sdplug-odd"))
    with pytest.raises(PluginError, match="sdplug-odd") as info:
        registries[family].get("odd")
    assert what in str(info.value)


def test_a_well_declared_plugin_registers_and_every_builtin_does():
    registries = registries_with("noise", FakeEntryPoint("prepared", PreparedButTimeless, dist="x"))
    with pytest.raises(PluginError):
        registries["noise"].get("prepared")

    class Prepared(PreparedButTimeless):
        uses_timesteps = True

    registries = registries_with("noise", FakeEntryPoint("prepared", Prepared, dist="x"))
    assert registries["noise"].get("prepared").cls is Prepared
    for registry in build_registries().values():
        assert registry.names()  # every built-in passed the same check when it registered


# -- only drop decisions work on cached text ---------------------------------------------------


def test_cached_text_refusal_names_what_the_registry_allows():
    assert cached_text_caption_types() == ["dropout"]
    with pytest.raises(PresetError, match="'dropout' only") as info:
        parse_preset({"memory": {"cache_text_encoder_outputs": True}, "caption": [{"type": "shuffle"}]})
    assert info.value.key == "caption[0].type"


def test_every_host_table_is_one_flag_type_whose_sections_the_preset_knows():
    """kohya's, EveryDream2's and the diffusers scripts' tables are rows of one ``HostFlag``,
    each taken over only by sections a preset has (a family's, or one ``memory.<key>``)."""
    from sdplug.hosts.diffusers_scripts.flags import FLAGS as DIFFUSERS
    from sdplug.hosts.everydream.flags import KEYS as EVERYDREAM
    from sdplug.hosts.host_flags import KINDS, HostFlag
    from sdplug.hosts.kohya.flags import FLAGS as KOHYA
    from sdplug.preset.settings import MemorySettings, settings_table
    from sdplug.strategies.families import FAMILY_TABLE

    sections = {family.section for family in FAMILY_TABLE} | {f"memory.{key}" for key in settings_table(MemorySettings())}
    for table in (KOHYA, EVERYDREAM, DIFFUSERS):
        assert table and all(type(row) is HostFlag for row in table)
        for row in table:
            assert row.kind in KINDS and row.why, row
            assert set(row.sections) <= sections, row
    with pytest.raises(ValueError, match="kind 'ignored-by-mistake'"):
        HostFlag("x", ("noise",), "a trick", kind="ignored-by-mistake")
