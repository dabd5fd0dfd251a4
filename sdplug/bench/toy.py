"""The evidence benches' workbench: synthetic class-conditional images, a tiny UNet, a training
loop through the public plan API, a DDIM sampler with classifier-free guidance, a small classifier.

Why its own model and data rather than the embedded SD model: the benches train dozens of
models from scratch on a 2-core CPU in minutes, so every piece is as small as the effect under
test allows. Images are 16x16 RGB in [-1, 1] drawn from tensors (no PIL); a class is a label
index and the empty caption maps to one extra "null" label (what caption dropout trains and
classifier-free guidance subtracts). The sampler never clips: a blown-up sample stays visible.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sdplug.bench import metrics
from sdplug.plan import Plan
from sdplug.preset import Preset, parse_preset
from sdplug.process import Flow, flow_sigmas
from sdplug.schedule import scaled_linear_alphas_cumprod

SIZE = 16
COLOURS = {"red": (0.85, -0.75, -0.75), "green": (-0.75, 0.6, -0.7), "blue": (-0.7, -0.55, 0.85), "yellow": (0.85, 0.7, -0.75)}
SHAPES = ("circle", "square", "bar")
BRIGHTNESS = {"black": -0.94, "dark": -0.5, "grey": 0.0, "light": 0.5, "white": 0.94}


def schedule() -> torch.Tensor:
    """Stable Diffusion's training schedule (scaled_linear, 1000 steps)."""
    return scaled_linear_alphas_cumprod()


def preset(name: str, data: dict) -> Preset:
    """A preset written in code, validated as a file would be (``bench:<name>`` in messages)."""
    return parse_preset({"preset": {"name": name}, **data}, path=f"bench:{name}")


# -- data ----------------------------------------------------------------------------------------
def _masks(shape_index: torch.Tensor, generator: torch.Generator, scale: float) -> torch.Tensor:
    """(N, 1, S, S) masks of a circle / square / horizontal bar at a random place and size."""
    n = len(shape_index)
    grid = (torch.arange(SIZE, dtype=torch.float32) + 0.5) / SIZE
    yy, xx = grid.view(1, SIZE, 1), grid.view(1, 1, SIZE)
    radius = (0.18 + 0.1 * torch.rand(n, generator=generator)) * scale
    cy = radius + (1 - 2 * radius) * torch.rand(n, generator=generator)
    cx = radius + (1 - 2 * radius) * torch.rand(n, generator=generator)
    r, cy, cx = radius.view(n, 1, 1), cy.view(n, 1, 1), cx.view(n, 1, 1)
    circle = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2
    square = ((yy - cy).abs() <= r * 0.85) & ((xx - cx).abs() <= r * 0.85)
    bar = ((yy - cy).abs() <= r * 0.45) & ((xx - cx).abs() <= r * 1.3)
    masks = torch.where(shape_index.view(n, 1, 1) == 0, circle, torch.where(shape_index.view(n, 1, 1) == 1, square, bar))
    return masks.unsqueeze(1).float()


def brightness_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Class = background brightness (``BRIGHTNESS`` order); a small shape a little lighter or
    darker than the background, so each image's mean stays near its class level, from
    near-black to near-white."""
    n = len(labels)
    levels = torch.tensor(list(BRIGHTNESS.values()))[labels]
    background = (levels + 0.04 * torch.randn(n, generator=generator)).view(n, 1, 1, 1)
    direction = torch.where(levels > 0, -1.0, 1.0).view(n, 1, 1, 1)
    tint = 0.1 * torch.randn(n, 3, 1, 1, generator=generator)
    shape = background + direction * 0.3 + tint
    mask = _masks(torch.randint(0, len(SHAPES), (n,), generator=generator), generator, scale=0.8)
    return (background * (1 - mask) + shape * mask).clamp(-1, 1).expand(n, 3, SIZE, SIZE).contiguous()


def shape_classes() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def shape_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Class = (colour, shape) (``shape_classes`` order) on a random grey background."""
    n = len(labels)
    colours = torch.tensor(list(COLOURS.values()))[labels // len(SHAPES)].view(n, 3, 1, 1)
    fill = (colours + 0.08 * torch.randn(n, 3, 1, 1, generator=generator)).clamp(-1, 1)
    background = (-0.6 + 1.2 * torch.rand(n, 1, 1, 1, generator=generator)).expand(n, 3, 1, 1)
    mask = _masks(labels % len(SHAPES), generator, scale=1.3)
    return background * (1 - mask) + fill * mask


@dataclasses.dataclass
class Dataset:
    images: torch.Tensor  # (N, 3, S, S) in [-1, 1]
    labels: torch.Tensor  # (N,)
    names: list[str]  # class names, the "captions"


def make_dataset(kind: str, count: int, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    names = list(BRIGHTNESS) if kind == "brightness" else shape_classes()
    labels = torch.arange(count) % len(names)
    labels = labels[torch.randperm(count, generator=generator)]
    draw = brightness_images if kind == "brightness" else shape_images
    return Dataset(draw(labels, generator), labels, names)


# -- model ---------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, cond: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(cond, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(c)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class TinyUNet(nn.Module):
    """16x16 -> 8x8 -> 4x4 and back, conditioned on the timestep and a label (FiLM); the last
    label index is the null class, the empty caption."""

    def __init__(self, classes: int, width: int = 32, cond: int = 64):
        super().__init__()
        self.cond = cond
        self.time = nn.Sequential(nn.Linear(cond, cond), nn.SiLU(), nn.Linear(cond, cond))
        self.label = nn.Embedding(classes + 1, cond)
        self.null = classes
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.down1, self.down2 = _Block(width, width, cond), _Block(width, 2 * width, cond)
        self.mid = _Block(2 * width, 2 * width, cond)
        self.up2, self.up1 = _Block(4 * width, width, cond), _Block(2 * width, width, cond)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        half = self.cond // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = t.float().view(-1, 1) * freqs.view(1, -1)
        c = self.time(torch.cat([angles.sin(), angles.cos()], dim=1)) + self.label(labels)
        h0 = self.down1(self.inp(x), c)  # 16x16
        h1 = self.down2(F.avg_pool2d(h0, 2), c)  # 8x8
        h = self.mid(F.avg_pool2d(h1, 2), c)  # 4x4
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0), h1], dim=1), c)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0), h0], dim=1), c)
        return self.out(h)


# -- training through the plan ------------------------------------------------------------------
@dataclasses.dataclass
class Trained:
    model: TinyUNet  # the EMA weights, in eval mode
    plan: Plan
    losses: list[float]


def train(
    plan: Plan,
    data: Dataset,
    *,
    steps: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    ema_decay: float = 0.995,
    width: int = 32,
    on_step: Callable[[int, TinyUNet], None] | None = None,
    tick: Callable[[], None] | None = None,
) -> Trained:
    """Train a fresh ``TinyUNet`` for ``steps`` steps, every random draw from the plan's streams
    (noise, timesteps, caption dropout) or from ``seed`` (weights, data order). ``on_step(step,
    ema_model)`` runs after each step (for evaluations during training)."""
    torch.manual_seed(seed)
    model = TinyUNet(len(data.names), width=width)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = plan.optimizer(model.parameters(), default=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0))
    order = torch.Generator().manual_seed(seed + 1_000_003)
    losses: list[float] = []
    for step in range(1, steps + 1):
        index = torch.randint(0, len(data.labels), (batch_size,), generator=order)
        x0, labels = data.images[index], data.labels[index]
        dropped = torch.tensor([plan.caption(data.names[int(k)]).dropped for k in labels])
        labels = torch.where(dropped, model.null, labels)
        t = plan.timesteps(batch_size)
        noise = plan.noise(x0, timesteps=t)
        x_t = plan.noisy_input(x0, noise, t)
        prediction = plan.prediction(model(x_t, plan.model_time(t), labels), x_t, t)
        loss = plan.loss(prediction, plan.target(x0, noise, t), t).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        plan.step()
        losses.append(loss.item())
        decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA follows the model
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if tick is not None:
            tick()
        if on_step is not None:
            on_step(step, ema)
    return Trained(ema, plan, losses)


# -- sampling ------------------------------------------------------------------------------------
def start_noise(plan: Plan, count: int, seed: int, family: str) -> torch.Tensor:
    """The sampler's x_T: the plan's training noise family (drawn inside ``plan.validation()``,
    so training's draws and audit are untouched) or plain N(0, I)."""
    generator = torch.Generator().manual_seed(seed)
    zeros = torch.zeros(count, 3, SIZE, SIZE)
    if family == "gaussian":
        return torch.randn(zeros.shape, generator=generator)
    start = torch.full((count,), plan.num_train_timesteps - 1, dtype=torch.long)  # x_T: the last timestep's noise
    with plan.validation():
        return plan.noise(zeros, generator=generator, timesteps=start).target.float()


@torch.no_grad()
def ddim(
    model: TinyUNet,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    steps: int = 25,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) with classifier-free guidance, "leading" timestep spacing as
    Stable Diffusion's scheduler (steps_offset 1), ending at a clean image. Never clips."""
    total = len(alphas_cumprod)
    timesteps = [i * (total // steps) + 1 for i in range(steps)][::-1]
    null = torch.full_like(labels, model.null)
    for i, t in enumerate(timesteps):
        tt = torch.full((len(x),), t, dtype=torch.long)
        if guidance == 1.0:
            out = model(x, tt, labels)
        else:
            both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([null, labels]))
            uncond, cond = both.chunk(2)
            out = uncond + guidance * (cond - uncond)
        a = alphas_cumprod[t]
        a_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        if prediction_type == "epsilon":
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        elif prediction_type == "v_prediction":
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
            eps = a.sqrt() * out + (1 - a).sqrt() * x
        else:
            x0 = out
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def flow_process() -> Flow:
    """A rectified flow over 1000 unshifted sigmas, velocity prediction (SD3's process)."""
    return Flow(flow_sigmas(1000))


@torch.no_grad()
def flow_euler(model: TinyUNet, x: torch.Tensor, labels: torch.Tensor, *, steps: int = 20, guidance: float = 1.0) -> torch.Tensor:
    """The flow-matching Euler sampler, ``x += (s_next - s) v`` from sigma 1 to 0 in ``steps``
    equal steps (diffusers' ``FlowMatchEulerDiscreteScheduler`` without shift), the model's
    time ``s * 1000``, with classifier-free guidance. Never clips."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    null = torch.full_like(labels, model.null)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        tt = torch.full((len(x),), float(s) * 1000)
        if guidance == 1.0:
            v = model(x, tt, labels)
        else:
            uncond, cond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([null, labels])).chunk(2)
            v = uncond + guidance * (cond - uncond)
        x = x + (s_next - s) * v
    return x


# -- a small classifier: accuracy and features --------------------------------------------------
class Classifier(nn.Module):
    def __init__(self, classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x.clamp(-1, 1))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x.clamp(-1, 1)).argmax(dim=1)


def train_classifier(data: Dataset, *, steps: int, seed: int, batch_size: int = 64) -> Classifier:
    """A classifier of the data's labels, trained with light noise so it is not brittle on
    samples that are nearly right."""
    torch.manual_seed(seed)
    net = Classifier(len(data.names))
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(data.labels), (batch_size,), generator=generator)
        x = data.images[index] + 0.05 * torch.randn(batch_size, 3, SIZE, SIZE, generator=generator)
        loss = F.cross_entropy(net(x), data.labels[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return net.eval()


def accuracy(classifier: Classifier, images: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    return float((classifier.predict(images) == torch.as_tensor(labels)).float().mean())


@dataclasses.dataclass
class ShapesJudge:
    """The shapes data of a quality bench, and how its samples are judged: the unbiased MMD² on
    a small classifier's features against held-out images, and that classifier's accuracy."""

    data: Dataset
    classifier: Classifier
    scorer: metrics.FeatureMMD
    classifier_accuracy: float


def shapes_judge(train_images: int, classifier_steps: int, tick: Callable[[int], None]) -> ShapesJudge:
    """Fixed seeds for the data, the held-out reference and the classifier (every run of a bench
    is judged alike); ``tick`` counts the classifier's work for the progress bar."""
    data = make_dataset("shapes", train_images, seed=12345)
    reference = make_dataset("shapes", 24 * len(data.names), seed=54321)
    classifier = train_classifier(data, steps=classifier_steps, seed=0)
    tick(classifier_steps // 10)
    scorer = metrics.FeatureMMD(classifier.embed, reference.images)
    return ShapesJudge(data, classifier, scorer, accuracy(classifier, reference.images, reference.labels))
