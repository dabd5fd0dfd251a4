"""A small stand-in for EveryDream2: same module paths, plugin interface and step structure.

Written from EveryDream2's interfaces (no code of it): ``train.py`` whose ``main(args)`` loads
the models and noise scheduler, builds the plugins from ``args.plugins`` before the dataset
and ``EveryDreamOptimizer``, validates once before training and runs the whole step in the
closure ``get_model_prediction_and_target`` (randn, pyramid noise, zero-frequency noise,
uniform timesteps in ``[timestep_start, timestep_end)``, ``add_noise``, target, min-SNR in the
epsilon form, the loss type and ``loss_scale``); ``plugins/plugins.py`` (``BasePlugin``,
``load_plugin``, ``PluginRunner``); ``data/every_dream.py`` (the caption, ``cond_dropout``
swapping in the tokens of ``" "``, integer ``loss_scale``); ``optimizer/optimizers.py``
(``EveryDreamOptimizer`` with ``create_optimizers``). train.json is merged into ``args`` and
the command line wins, as in EveryDream2. A tiny model trains on CPU in about a second, and
the tree records what the closure saw in ``log_folder/standin-record.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

PLUGINS = """
import importlib


class BasePlugin:
    def on_epoch_start(self, **kwargs):
        pass

    def on_epoch_end(self, **kwargs):
        pass

    def on_training_start(self, **kwargs):
        pass

    def on_training_end(self, **kwargs):
        pass

    def on_step_start(self, **kwargs):
        pass

    def on_step_end(self, **kwargs):
        pass

    def transform_caption(self, caption: str):
        return caption

    def transform_pil_image(self, img):
        return img


def load_plugin(plugin_path):
    module_name, class_name = plugin_path.rsplit(".", 1)
    plugin_class = getattr(importlib.import_module(module_name), class_name)
    if not issubclass(plugin_class, BasePlugin):
        raise TypeError(f"{plugin_path} is not a valid plugin")
    return plugin_class()


class PluginRunner:
    def __init__(self, plugins=()):
        self.plugins = list(plugins)

    def _run(self, name, kwargs):
        for plugin in self.plugins:
            getattr(plugin, name)(**kwargs)

    def run_on_training_start(self, **kwargs):
        self._run("on_training_start", kwargs)

    def run_on_training_end(self, **kwargs):
        self._run("on_training_end", kwargs)

    def run_on_epoch_start(self, **kwargs):
        self._run("on_epoch_start", kwargs)

    def run_on_epoch_end(self, **kwargs):
        self._run("on_epoch_end", kwargs)

    def run_on_step_start(self, **kwargs):
        self._run("on_step_start", kwargs)

    def run_on_step_end(self, **kwargs):
        self._run("on_step_end", kwargs)

    def run_transform_caption(self, caption):
        for plugin in self.plugins:
            caption = plugin.transform_caption(caption)
        return caption
"""

EVERY_DREAM = """
import random

import torch
from torch.utils.data import Dataset


class EveryDreamBatch(Dataset):
    def __init__(self, items, conditional_dropout=0.02, tokenizer=None, seed=555, shuffle_tags=False, plugin_runner=None):
        self.items = items
        self.conditional_dropout = conditional_dropout
        self.tokenizer = tokenizer
        self.seed = seed
        self.shuffle_tags = shuffle_tags
        self.plugin_runner = plugin_runner

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        example = {"image": item["image"], "caption": item["caption"]}
        if self.shuffle_tags:
            tags = [t.strip() for t in example["caption"].split(",")]
            random.Random(self.seed + i).shuffle(tags)
            example["caption"] = ", ".join(tags)
        example["caption"] = self.plugin_runner.run_transform_caption(example["caption"])
        text = example["caption"] if random.random() > item.get("cond_dropout", self.conditional_dropout) else " "
        example["tokens"] = self.tokenizer(text, truncation=True, padding="max_length", max_length=self.tokenizer.model_max_length).input_ids
        example["tokens"] = torch.tensor(example["tokens"])
        example["runt_size"] = 0
        example["loss_scale"] = item.get("loss_scale", 1)  # an int unless a multiplier is set
        return example


def collate_fn(batch):
    loss_scale = torch.tensor([example.get("loss_scale", 1) for example in batch])
    return {
        "tokens": torch.stack([example["tokens"] for example in batch]),
        "image": torch.stack([example["image"] for example in batch]),
        "captions": [example["caption"] for example in batch],
        "runt_size": batch[0]["runt_size"],
        "loss_scale": loss_scale
    }


def build_torch_dataloader(dataset, batch_size):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_fn)
"""

OPTIMIZERS = """
import itertools

import torch


class EveryDreamOptimizer:
    def __init__(self, args, optimizer_config, text_encoder, unet, epoch_len, log_writer=None):
        del optimizer_config["doc"]
        self.base_config = dict(optimizer_config["base"])
        self.te_config = dict(optimizer_config["text_encoder_overrides"])
        self.te_config["lr"] = self.te_config.get("lr") or self.base_config.get("lr")
        self.te_config["optimizer"] = self.te_config.get("optimizer") or self.base_config.get("optimizer")
        self.unet = unet
        self.text_encoder_params = itertools.chain(text_encoder.parameters())
        self.unet_params = unet.parameters()
        self.optimizers = []
        self.optimizer_te, self.optimizer_unet = self.create_optimizers(args, self.text_encoder_params, self.unet_params)
        for optimizer in (self.optimizer_te, self.optimizer_unet):
            if optimizer is not None:
                self.optimizers.append(optimizer)
        self.lr_schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for o in self.optimizers]

    def create_optimizers(self, args, text_encoder_params, unet_params):
        te = None if args.disable_textenc_training else self._create_optimizer(args, self.te_config, text_encoder_params)
        unet = None if args.disable_unet_training else self._create_optimizer(args, self.base_config, unet_params)
        return te, unet

    def _create_optimizer(self, args, config, parameters):
        lr = args.lr if args.lr is not None else config.get("lr", 1e-6)
        # the stand-in builds torch's AdamW for every name (it has no bitsandbytes)
        return torch.optim.AdamW(itertools.chain(parameters), lr=lr)

    def step(self, loss, step, global_step):
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for scheduler in self.lr_schedulers:
            scheduler.step()

    def get_unet_lr(self):
        return self.optimizer_unet.param_groups[0]["lr"] if self.optimizer_unet is not None else 0

    def get_textenc_lr(self):
        return self.optimizer_te.param_groups[0]["lr"] if self.optimizer_te is not None else 0
"""

MODELS = '''
import torch
from diffusers import UNet2DConditionModel


class Tokenizer:
    """Begin, one id per word, end, padding: "" and " " give the same row."""

    model_max_length = 8

    def _ids(self, text, max_length):
        words = text.replace(",", " ").split()
        ids = [1] + [sum(map(ord, w)) % 90 + 3 for w in words][: max_length - 2] + [2]
        return ids + [0] * (max_length - len(ids))

    def __call__(self, text, truncation=True, padding="max_length", max_length=8):
        class Out:
            pass

        out = Out()
        out.input_ids = [self._ids(t, max_length) for t in text] if isinstance(text, list) else self._ids(text, max_length)
        return out


class TextEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(96, 16)

    def forward(self, ids):
        return self.embed(ids)


class Latents:
    def __init__(self, mean):
        self.mean = mean

    def sample(self):
        return self.mean + 0.1 * torch.randn_like(self.mean)


class Vae(torch.nn.Module):
    """Halves the image: 3 x 16 x 16 -> 4 x 8 x 8."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 2, stride=2)

    def encode(self, x, return_dict=True):
        return (Latents(self.conv(x)),)


def unet():
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
'''

TRAIN = """
import argparse
import json
import os
import random

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

import standin_models
from data.every_dream import EveryDreamBatch, build_torch_dataloader
from optimizer.optimizers import EveryDreamOptimizer


def pyramid_noise_like(x, discount=0.8):
    b, c, h, w = x.shape
    noise = torch.randn_like(x)
    for i in range(1, 10):
        r = random.random() * 2 + 2
        size = (max(1, int(h / r**i)), max(1, int(w / r**i)))
        noise += torch.nn.functional.interpolate(torch.randn(b, c, *size), size=(h, w), mode="bilinear") * discount**i
        if size[0] == 1 or size[1] == 1:
            break
    return noise / noise.std()


def compute_snr(timesteps, noise_scheduler):
    a = noise_scheduler.alphas_cumprod[timesteps].float()
    return a / (1 - a)


def load_train_json_from_file(args):
    with open(args.config, "rt") as f:
        args.__dict__.update(json.load(f))


def main(args):
    log_folder = os.path.join(args.logdir, f"{args.project_name}-standin")
    os.makedirs(log_folder, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    noise_scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False,
        prediction_type=args.standin_prediction_type, rescale_betas_zero_snr=bool(args.enable_zero_terminal_snr),
    )
    unet, text_encoder, tokenizer, vae = standin_models.unet(), standin_models.TextEncoder(), standin_models.Tokenizer(), standin_models.Vae()
    vae.requires_grad_(False)
    open(os.path.join(log_folder, "standin-models-loaded"), "w").close()

    from plugins.plugins import load_plugin
    if args.plugins is not None:
        plugins = [load_plugin(name) for name in args.plugins]
    else:
        plugins = []
    from plugins.plugins import PluginRunner
    plugin_runner = PluginRunner(plugins=plugins)

    generator = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(3, 16, 16, generator=generator) * 2 - 1, "caption": f"sks dog, photo {i}, grass, sunny"} for i in range(8)]
    train_batch = EveryDreamBatch(items, conditional_dropout=args.cond_dropout, tokenizer=tokenizer, seed=args.seed,
                                  shuffle_tags=args.shuffle_tags, plugin_runner=plugin_runner)
    epoch_len = len(train_batch) // args.batch_size
    with open(args.optimizer_config) as f:
        optimizer_config = json.load(f)
    ed_optimizer = EveryDreamOptimizer(args,
                                       optimizer_config, text_encoder, unet, epoch_len)
    train_dataloader = build_torch_dataloader(train_batch, batch_size=args.batch_size)
    record = {"noise_sums": [], "timesteps": [], "dropped": [], "loss_scales": [], "losses": [], "validation_noise_sums": [],
              "validation_timesteps": [], "zero_frequency_noise_ratio": [], "settings": {}}
    empty = torch.tensor(tokenizer(" ", max_length=tokenizer.model_max_length).input_ids)

    def get_model_prediction_and_target(image, tokens, zero_frequency_noise_ratio=0.0, return_loss=False, loss_scale=None, embedding_perturbation=0.0):
        with torch.no_grad():
            latents = vae.encode(image, return_dict=False)
            latents = latents[0].sample() * 0.18215
            noise = torch.randn_like(latents)
            if args.pyramid_noise_discount != None:
                if 0 < args.pyramid_noise_discount:
                    noise = pyramid_noise_like(noise, discount=args.pyramid_noise_discount)
            if zero_frequency_noise_ratio != None:
                noise = noise + zero_frequency_noise_ratio * torch.randn(latents.shape[0], latents.shape[1], 1, 1)
            bsz = latents.shape[0]
            timesteps = torch.randint(args.timestep_start, args.timestep_end, (bsz,), device=latents.device)
            timesteps = timesteps.long()
        encoder_hidden_states = text_encoder(tokens)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        elif noise_scheduler.config.prediction_type in ["v_prediction", "v-prediction"]:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        prefix = "" if return_loss else "validation_"
        record[prefix + "noise_sums"].append(float(noise.double().sum()))
        record[prefix + "timesteps"].append(timesteps.tolist())
        if return_loss:
            record["dropped"] += [bool(torch.equal(row, empty)) for row in tokens]
            record["zero_frequency_noise_ratio"].append(zero_frequency_noise_ratio)
            if loss_scale is None:
                loss_scale = torch.ones(model_pred.shape[0], dtype=torch.float)
            if args.min_snr_gamma is not None:
                snr = compute_snr(timesteps, noise_scheduler)
                loss_scale = loss_scale * torch.minimum(snr, torch.full_like(snr, args.min_snr_gamma)) / snr
            record["loss_scales"].append(loss_scale.tolist())
            loss_mse = F.mse_loss(model_pred.float(), target.float(), reduction="none")
            loss_scale = loss_scale.view(-1, 1, 1, 1).expand_as(loss_mse)
            if args.loss_type == "mse_huber":
                bias = (timesteps / noise_scheduler.config.num_train_timesteps).float().view(-1, 1, 1, 1)
                loss_huber = F.huber_loss(model_pred.float(), target.float(), reduction="none", delta=1.0)
                loss = (loss_mse * loss_scale * bias).mean() + (loss_huber * loss_scale * (1 - bias)).mean()
            else:
                loss = (loss_mse * loss_scale).mean()
            return model_pred, target, loss
        return model_pred, target

    def validate():
        state = torch.get_rng_state()
        with torch.no_grad():
            torch.manual_seed(555)
            for batch in build_torch_dataloader(EveryDreamBatch(items[:4], 0, tokenizer, plugin_runner=PluginRunner()), 4):
                get_model_prediction_and_target(batch["image"], batch["tokens"])
        torch.set_rng_state(state)

    if args.standin_validate:
        validate()  # before training, as EveryDream2 does
    record["settings"] = {k: getattr(args, k) for k in ("cond_dropout", "pyramid_noise_discount", "min_snr_gamma", "loss_type", "zero_frequency_noise_ratio")}
    record["settings"]["dataset_cond_dropout"] = train_batch.conditional_dropout
    global_step = 0
    plugin_runner.run_on_training_start(log_folder=log_folder, project_name=args.project_name)
    for epoch in range(args.max_epochs):
        plugin_runner.run_on_epoch_start(epoch=epoch, global_step=global_step, project_name=args.project_name, log_folder=log_folder)
        for step, batch in enumerate(train_dataloader):
            if global_step >= args.standin_max_steps:
                break
            if global_step == args.standin_crash_at_step:
                raise RuntimeError("stand-in crash")
            ed_state = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "vae": vae,
                        "scheduler": noise_scheduler, "optimizer": ed_optimizer}
            plugin_runner.run_on_step_start(epoch=epoch,
                                            local_step=step,
                                            global_step=global_step,
                                            project_name=args.project_name,
                                            log_folder=log_folder,
                                            batch=batch,
                                            ed_state=ed_state)
            model_pred, target, loss = get_model_prediction_and_target(batch["image"],
                                                                       batch["tokens"],
                                                                       args.zero_frequency_noise_ratio,
                                                                       return_loss=True,
                                                                       loss_scale=batch["loss_scale"],
                                                                       embedding_perturbation=args.embedding_perturbation)
            if global_step == args.standin_nan_loss_at_step:
                loss = loss * float("nan")  # stand-in only: an overflow in a step
            record["losses"].append(float(loss.detach()))
            ed_optimizer.step(loss, step, global_step)
            if args.standin_validate:
                validate()
            plugin_runner.run_on_step_end(epoch=epoch, global_step=global_step, batch=batch, ed_state=ed_state)
            global_step += 1
        plugin_runner.run_on_epoch_end(epoch=epoch, global_step=global_step)
    plugin_runner.run_on_training_end()
    optimizers = ed_optimizer.optimizers
    record["optimizer"] = [type(o).__module__ + "." + type(o).__name__ for o in optimizers]
    record["learning_rates"] = [[g["lr"] for g in o.param_groups] for o in optimizers]
    record["textenc_lr"] = ed_optimizer.get_textenc_lr()
    record["attn_processors"] = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    with open(os.path.join(log_folder, "standin-record.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    argparser = argparse.ArgumentParser(description="EveryDream2 stand-in")
    argparser.add_argument("--config", type=str, required=False, default=None)
    args, argv = argparser.parse_known_args()
    if args.config:
        load_train_json_from_file(args)

    argparser = argparse.ArgumentParser(description="EveryDream2 stand-in")
    argparser.add_argument("--attn_type", type=str, default="sdp", choices=["xformers", "sdp", "slice"])
    argparser.add_argument("--batch_size", type=int, default=4)
    argparser.add_argument("--cond_dropout", type=float, default=0.04)
    argparser.add_argument("--disable_amp", action="store_true", default=False)
    argparser.add_argument("--disable_textenc_training", action="store_true", default=False)
    argparser.add_argument("--disable_unet_training", action="store_true", default=False)
    argparser.add_argument("--embedding_perturbation", type=float, default=0.0)
    argparser.add_argument("--gradient_checkpointing", action="store_true", default=False)
    argparser.add_argument("--logdir", type=str, default="logs")
    argparser.add_argument("--loss_type", type=str, default="mse_huber", choices=["huber", "mse", "mse_huber"])
    argparser.add_argument("--lr", type=float, default=None)
    argparser.add_argument("--max_epochs", type=int, default=2)
    argparser.add_argument("--optimizer_config", default="optimizer.json")
    argparser.add_argument("--plugins", nargs="+")
    argparser.add_argument("--project_name", type=str, default="myproj")
    argparser.add_argument("--seed", type=int, default=555)
    argparser.add_argument("--shuffle_tags", action="store_true", default=False)
    argparser.add_argument("--keep_tags", type=int, default=0)
    argparser.add_argument("--timestep_start", type=int, default=0)
    argparser.add_argument("--timestep_end", type=int, default=1000)
    argparser.add_argument("--zero_frequency_noise_ratio", type=float, default=0.02)
    argparser.add_argument("--enable_zero_terminal_snr", action="store_true", default=None)
    argparser.add_argument("--min_snr_gamma", type=int, default=None)
    argparser.add_argument("--pyramid_noise_discount", type=float, default=None)
    # stand-in only
    argparser.add_argument("--standin_prediction_type", default="epsilon")
    argparser.add_argument("--standin_max_steps", type=int, default=3)
    argparser.add_argument("--standin_validate", action="store_true", default=False)
    argparser.add_argument("--standin_crash_at_step", type=int, default=None)
    argparser.add_argument("--standin_nan_loss_at_step", type=int, default=None)

    args = argparser.parse_args(args=argv, namespace=args)

    main(args)
"""

OPTIMIZER_JSON = {
    "doc": {"base": "base optimizer configuration for unet and text encoder"},
    "base": {
        "optimizer": "adamw8bit",
        "lr": 1e-6,
        "lr_scheduler": "constant",
        "betas": [0.9, 0.999],
        "epsilon": 1e-8,
        "weight_decay": 0.01,
    },
    "text_encoder_overrides": {"optimizer": None, "lr": 5e-7},
}


def make_standin(root: Path) -> Path:
    """Write a stand-in EveryDream2 tree (main's layout) under ``root``."""
    for folder in ("plugins", "data", "optimizer"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").write_text("")
    (root / "plugins" / "plugins.py").write_text(PLUGINS)
    (root / "data" / "every_dream.py").write_text(EVERY_DREAM)
    (root / "optimizer" / "optimizers.py").write_text(OPTIMIZERS)
    (root / "standin_models.py").write_text(MODELS)
    (root / "train.py").write_text(TRAIN)
    (root / "optimizer.json").write_text(json.dumps(OPTIMIZER_JSON, indent=2))
    return root
