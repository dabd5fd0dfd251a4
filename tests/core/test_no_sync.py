"""No plan call of a training step waits for the device: no .item(), .tolist(), bool(), float(),
int() of a tensor inside any of them; the audit syncs once, when it is read.

On a GPU each of those is a host-device synchronisation; on this CPU the test makes them raise
inside every plan call, which catches the same code.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import sdplug
from sdplug.preset import parse_preset
from sdplug.schedule import scaled_linear_alphas_cumprod

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
STEP_CALLS = (
    "noise",
    "timesteps",
    "noisy_input",
    "target",
    "loss",
    "unweighted_loss",
    "weight",
    "caption",
    "caption_dropped",
    "step",
)

# Immiscible noise solves its assignment on the CPU (a linear assignment problem): it reads the
# batch back once per step by design; see its docstring. (Pyramid noise draws its level sizes
# from the plan's host stream, so it is checked like every other strategy.)
HOST_DECIDED = {("noise", "immiscible")}


class SyncInStep(AssertionError):
    pass


@contextlib.contextmanager
def syncs_raise_inside(plan):
    inside = {"depth": 0}
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def guarded(name):
        original = originals[name]

        @functools.wraps(original)
        def method(self, *args, **kwargs):
            if inside["depth"]:
                raise SyncInStep(f"Tensor.{name} inside a plan call")
            return original(self, *args, **kwargs)

        return method

    def entered(call):
        @functools.wraps(call)
        def method(*args, **kwargs):
            inside["depth"] += 1
            try:
                return call(*args, **kwargs)
            finally:
                inside["depth"] -= 1

        return method

    for name in SYNCS:
        setattr(torch.Tensor, name, guarded(name))
    for name in STEP_CALLS:
        setattr(plan, name, entered(getattr(plan, name)))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for name in STEP_CALLS:
            delattr(plan, name)  # the instance attribute: the class method again


def run_steps(plan, steps=3, batch=4):
    for _ in range(steps):
        latents = torch.randn(batch, 4, 16, 16)
        texts = [plan.caption("a red circle, on a black background, small") for _ in range(batch)]
        if all(not t.needs_text for t in plan.caption_pipeline.transforms):
            plan.caption_dropped()  # the cached-embeddings route, where it applies
        t = plan.timesteps(batch, device=latents.device)
        noise = plan.noise(latents, timesteps=t)
        x_t = plan.noisy_input(latents, noise, t)
        prediction = x_t * 0.5
        plan.loss(prediction, plan.target(latents, noise, t), t).mean()
        plan.step()
    return texts


def one_of_each(family, name):
    entry = {"type": name}
    if (family, name) == ("timesteps", "biased"):
        entry["bias"] = "later"
    return entry


def all_cases():
    for family in ("noise", "timesteps", "loss", "loss_weighting", "caption"):
        for name in sdplug.available(family):
            if (family, name) not in HOST_DECIDED:
                yield family, name


def cases():
    """Every strategy with each process it declares: a DDPM (v-prediction) or a flow (shift 3) plan."""
    from sdplug.strategies import registry

    for family, name in all_cases():
        for process in sorted(registry(family).get(name).cls.processes):
            yield family, name, process


def bound(data: dict, process: str):
    preset = parse_preset(data, path="sync.toml")
    if process == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return preset.build(FlowMatchEulerDiscreteScheduler(shift=3.0))
    return preset.build(alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="v_prediction")


@pytest.mark.parametrize("family,name,process", list(cases()))
def test_no_plan_call_syncs(family, name, process):
    table = one_of_each(family, name)
    data = {family: [table]} if family in ("noise", "caption") else {family: table}
    if family == "caption" and name != "dropout":
        data["caption"].append({"type": "dropout", "rate": 0.5})
    plan = bound(data, process)
    assert plan.process.kind == process
    with syncs_raise_inside(plan):
        run_steps(plan)
    report = plan.report()  # reading syncs, once, outside the step
    assert report["steps"] == 3 and sum(report["timesteps"]["histogram"]) == 12
    assert report["problems"] == []


def test_the_guard_catches_a_sync():
    plan = parse_preset({}, path="sync.toml").build(alphas_cumprod=scaled_linear_alphas_cumprod(), prediction_type="epsilon")
    plan.noisy_input = lambda latents, noise, t: latents.sum().item()  # a sync where none belongs
    with pytest.raises(SyncInStep), syncs_raise_inside(plan):
        plan.noisy_input(torch.ones(1), None, None)
