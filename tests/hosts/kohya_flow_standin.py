"""Stand-ins for sd-scripts main's five rectified-flow LoRA scripts, on top of a main stand-in tree
(``kohya_standin.make_standin``), for ``sdplug check kohya``.

Written from the scripts' interfaces (no code of them): each script's ``setup_parser()`` builds
the real script's arguments -- names, whether each takes a value, defaults and choices -- from
``tests/data/kohya_flow_parsers.json`` (read from the real parsers by
``tests/hosts/kohya_parser_flags.py --write-flow``), and each script and its library module hold
the source the check fingerprints (the ``post_process_loss`` that returns the loss unchanged,
the draw function). They parse; they do not train.
"""

from __future__ import annotations

import json
from pathlib import Path

PARSERS = Path(__file__).parents[1] / "data" / "kohya_flow_parsers.json"

LIBRARY = {
    "flux_train_utils.py": "def get_noisy_model_input_and_timesteps(args, noise_scheduler, latents, noise, device, dtype):\n"
    "    raise NotImplementedError\n\n\n"
    "def apply_model_prediction_type(args, model_pred, noisy_model_input, sigmas):\n    raise NotImplementedError\n",
    "sd3_train_utils.py": "def get_noisy_model_input_and_timesteps(args, latents, noise, device, dtype):\n"
    "    raise NotImplementedError\n",
    "lumina_train_util.py": "def get_noisy_model_input_and_timesteps(args, noise_scheduler, latents, noise, device, dtype):\n"
    "    raise NotImplementedError\n",
    "anima_train_utils.py": "def compute_loss_weighting_for_anima(weighting_scheme, sigmas):\n    raise NotImplementedError\n",
}

SCRIPT = """
import argparse
import json

ARGUMENTS = json.loads({arguments!r})


def _type(default):
    return type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def setup_parser():
    parser = argparse.ArgumentParser()
    for name, spec in ARGUMENTS.items():
        if not spec["value"]:
            parser.add_argument("--" + name, action="store_true")
            continue
        options = {{"default": spec["default"]}}
        if "choices" in spec:
            options["choices"] = spec["choices"]
        if "nargs" in spec:
            options["nargs"] = spec["nargs"]
        elif _type(spec["default"]) is not None:
            options["type"] = _type(spec["default"])
        parser.add_argument("--" + name, **options)
    return parser


class FlowNetworkTrainer:
    def get_noise_pred_and_target(self, args, latents):
        noise = torch.randn_like(latents)
        return noise

    def post_process_loss(self, loss, args, timesteps, noise_scheduler):
        return loss
"""


def make_flow_scripts(root: Path) -> Path:
    """Write the five flow scripts and their library modules into the stand-in tree ``root``."""
    scripts = json.loads(PARSERS.read_text())["scripts"]
    for name, text in LIBRARY.items():
        (root / "library" / name).write_text(text)
    for script, arguments in scripts.items():
        (root / script).write_text(SCRIPT.format(arguments=json.dumps(arguments)))
    return root
