"""The trainer's start-up check of installed versions, the `train` extra, and how LoRA is attached."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from sdplug.errors import MissingDependencyError
from sdplug.trainer import requirements
from sdplug.trainer.requirements import KNOWN_BAD_PAIRS, TRAIN_EXTRA_PEFT, check_trainer_requirements

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

# the versions .ci/constraints.txt pins, which CI runs the trainer with
CI_PINS = {"diffusers": "0.42.1", "transformers": "5.23.0", "peft": "0.21.2", "accelerate": "1.15.0"}
FIX = f"pip install '{TRAIN_EXTRA_PEFT}'"


def fake_installed(monkeypatch, versions: dict[str, str | None]) -> None:
    def version(package: str) -> str:
        if versions.get(package) is None:
            raise importlib.metadata.PackageNotFoundError(package)
        return versions[package]

    # the module calls importlib.metadata.version(...) through the module, so this is what it sees
    monkeypatch.setattr(requirements.importlib.metadata, "version", version)


@pytest.mark.parametrize(
    "changed",
    [
        {},
        # the pair of the report: transformers' add_adapter refuses this peft, add_lora does not use it
        {"transformers": "5.24.0"},
        # an older environment keeps the peft it has (0.10-0.17 work with transformers 4, diffusers < 0.40)
        {"transformers": "4.57.6", "diffusers": "0.38.0", "peft": "0.10.0"},
        {"transformers": "4.57.6", "peft": "0.17.1"},
        {"diffusers": "0.39.0", "peft": "0.14.0"},
        {"peft": "0.15.0"},
    ],
)
def test_working_sets_pass(monkeypatch, changed):
    fake_installed(monkeypatch, {**CI_PINS, **changed})
    check_trainer_requirements()


@pytest.mark.parametrize(
    "changed, named, reason",
    [
        ({"transformers": "5.24.0", "peft": "0.17.1"}, ["transformers 5.24.0", "peft 0.17.1"], "HybridCache"),
        ({"transformers": "5.0.0", "peft": "0.16.0"}, ["transformers 5.0.0", "peft 0.16.0"], "HybridCache"),
        ({"transformers": "5.23.0", "peft": "0.17.0.dev0"}, ["transformers 5.23.0", "peft 0.17.0.dev0"], "HybridCache"),
        ({"diffusers": "0.42.1", "peft": "0.14.0"}, ["diffusers 0.42.1", "peft 0.14.0"], "disable_input_dtype_casting"),
        ({"diffusers": "0.40.0", "peft": "0.10.0"}, ["diffusers 0.40.0", "peft 0.10.0"], "disable_input_dtype_casting"),
    ],
)
def test_a_known_bad_pair_is_named_with_both_versions_the_reason_and_the_fix(monkeypatch, changed, named, reason):
    fake_installed(monkeypatch, {**CI_PINS, **changed})
    with pytest.raises(MissingDependencyError) as caught:
        check_trainer_requirements()
    message = str(caught.value)
    for words in [*named, reason, FIX]:
        assert words in message, (words, message)


def test_a_missing_or_too_old_package_is_named_with_the_install_command(monkeypatch):
    fake_installed(monkeypatch, {**CI_PINS, "peft": None})
    with pytest.raises(MissingDependencyError, match=r"needs peft>=0\.10 \(found none\).*pip install 'sdplug\[train\]'"):
        check_trainer_requirements()
    fake_installed(monkeypatch, {**CI_PINS, "diffusers": "0.25.0"})
    with pytest.raises(MissingDependencyError, match=r"needs diffusers>=0\.27 \(found 0\.25\.0\)"):
        check_trainer_requirements()


def test_the_fix_and_the_train_extra_leave_out_every_known_bad_peft():
    fix = SpecifierSet(Requirement(TRAIN_EXTRA_PEFT).specifier)
    peft_releases = [Version(f"0.{minor}.{patch}") for minor in range(10, 23) for patch in range(4)]
    for pair in KNOWN_BAD_PAIRS:
        assert pair.other == "peft" and Requirement(pair.fix).name == "peft"
        bad = [v for v in peft_releases if v in SpecifierSet(pair.other_versions)]
        assert bad, pair  # the table's range is not empty
        assert not [v for v in bad if v in fix], (pair, TRAIN_EXTRA_PEFT)
    # the released peft that works with every pair (checked with sdplug train) is allowed
    assert Version("0.21.2") in fix and Version("0.15.0") in fix


def test_the_train_extra_is_the_one_the_check_names():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["optional-dependencies"]["train"] == [TRAIN_EXTRA_PEFT]


def test_add_lora_attaches_through_peft_whatever_version_the_mixins_demand(monkeypatch):
    """transformers 5.24's add_adapter refuses every released peft (it asks for 0.22): add_lora
    must not go through the mixins, so raising their gates to an unreleased peft changes nothing."""
    pytest.importorskip("peft")
    diffusers_peft = pytest.importorskip("diffusers.loaders.peft")
    transformers_peft = pytest.importorskip("transformers.integrations.peft")
    from sdplug.trainer import lora, models

    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "99.0.0")
    monkeypatch.setattr(diffusers_peft, "MIN_PEFT_VERSION", "99.0.0")
    bundle = models.embedded()
    rank = 4
    before = torch.random.get_rng_state()
    trainable = lora.add_lora(bundle.unet, rank=rank, alpha=2.0, targets=lora.UNET_TARGETS, seed=0)
    trainable += lora.add_lora(bundle.text_encoder, rank=rank, alpha=2.0, targets=lora.TEXT_ENCODER_TARGETS, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the draw came from the seed, not the global stream

    grads = {n for m in (bundle.unet, bundle.text_encoder) for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all(".lora_A." in n or ".lora_B." in n for n in grads)
    assert trainable == sum(p.numel() for m in (bundle.unet, bundle.text_encoder) for p in m.parameters() if p.requires_grad)

    state = lora.kohya_state_dict(bundle.unet, bundle.text_encoder)
    layers = bundle.text_encoder.config.num_hidden_layers
    te_stems = {
        f"lora_te_text_model_encoder_layers_{i}_self_attn_{proj}"
        for i in range(layers)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    te_keys = {k for k in state if k.startswith("lora_te_")}
    assert te_keys == {f"{s}.{part}" for s in te_stems for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert any(k.startswith("lora_unet_") for k in state)
    for stem in te_stems:
        assert state[f"{stem}.lora_down.weight"].shape[0] == rank
        assert float(state[f"{stem}.alpha"]) == pytest.approx(2.0)
        assert not torch.any(state[f"{stem}.lora_up.weight"])  # peft's gaussian init: up starts at zero

    # trainable: a gradient reaches the text encoder's LoRA through its forward
    bundle.text_encoder.train()
    tokens = torch.randint(0, bundle.text_encoder.config.vocab_size - 2, (2, 6))
    bundle.text_encoder(tokens)[0].square().mean().backward()
    te_lora_b = [p for n, p in bundle.text_encoder.named_parameters() if ".lora_B." in n]
    assert te_lora_b and all(p.grad is not None and torch.any(p.grad) for p in te_lora_b)
