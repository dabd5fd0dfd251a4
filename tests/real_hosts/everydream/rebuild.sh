#!/usr/bin/env bash
# EveryDream2 (main, 5098db8) on CPU with the sdplug plugin: venv, tiny model, data, configs, 2 steps.
# Usage: ED2_GIT=<EveryDream2 git repo or URL> bash tests/real_hosts/everydream/rebuild.sh
#   WORK    [./sdplug-real-hosts/everydream]  where everything is built (venv, tree, model, data, logs)
#   SDPLUG  [this checkout]                   the sdplug source the wheel is built from
#   ED2_GIT [https://github.com/victorchall/EveryDream2trainer.git]  its main branch is archived
# Idempotent: the venv, tree and model are kept; the wheel is rebuilt and reinstalled every run.
# Two runs: the plugin on the unmodified tree (8), then `sdplug patch everydream` and a preset with
# [loss] given by --sdplug_preset alone, and `sdplug unpatch` checked byte for byte (9).
set -euo pipefail
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SDPLUG=${SDPLUG:-$(cd "$SCRIPTS/../../.." && pwd)}
HERE=${WORK:-$PWD/sdplug-real-hosts/everydream}
ED2_GIT=${ED2_GIT:-https://github.com/victorchall/EveryDream2trainer.git}
mkdir -p "$HERE" && cd "$HERE"
# EveryDream2's docker pins, adapted to CPU and torch 2.13 (torch itself is installed first)
printf 'torch==2.13.0\nnumpy==1.26.4\ndiffusers==0.27.2\ntransformers==4.38.2\nhuggingface_hub==0.25.2\nbitsandbytes==0.50.2\n' > constraints.txt
rm -rf stubs && mkdir -p stubs && cp -r "$SCRIPTS/../torchvision-stub/torchvision" stubs/  # torchvision 2.13's CPU wheel does not import
export OMP_NUM_THREADS=1

# 1. the venv: torch first, then EveryDream2's docker pins adapted (constraints.txt), and what train.py imports
if [ ! -x venv/bin/python ]; then
  ${PY:-python3} -m venv venv
  venv/bin/pip install -q "torch==2.13.0"
  venv/bin/pip install -q -c constraints.txt diffusers==0.27.2 transformers==4.38.2 huggingface_hub==0.25.2 \
    numpy==1.26.4 bitsandbytes==0.50.2 "accelerate<1.0" colorama tqdm compel==1.1.3 tensorboard wandb safetensors \
    pyyaml attrs Pillow ftfy pydantic tomli-w annotated-types packaging
fi

# 2. sdplug as a wheel (no dependency moves: they are installed above under the constraints)
rm -rf wheels && venv/bin/pip wheel -q --no-deps "$SDPLUG" -w wheels
venv/bin/pip install -q --force-reinstall --no-deps wheels/sdplug-*.whl

# 3. EveryDream2 main
if [ ! -f EveryDream2trainer/train.py ]; then
  mkdir -p EveryDream2trainer
  if [ -d "$ED2_GIT" ]; then git -C "$ED2_GIT" archive main | tar -x -C EveryDream2trainer
  else git clone -q --depth 1 "$ED2_GIT" EveryDream2trainer; fi
fi
ED2=$HERE/EveryDream2trainer

# 4. a tiny v-prediction model, built by this venv's transformers (a tokenizer saved by transformers 5 does not load in 4.38)
[ -f tiny-model/model_index.json ] || venv/bin/python "$SCRIPTS/build_tiny_model.py" "$HERE/tiny-model"

# 5. data: 4 images of 256 x 256 (EveryDream2's smallest resolution) with captions
mkdir -p data
DATA="$HERE/data" venv/bin/python - <<'PY'
import os
from PIL import Image
for i, (colour, name) in enumerate([((20, 20, 20), "black"), ((230, 230, 230), "white"), ((200, 40, 40), "red"), ((40, 40, 200), "blue")]):
    Image.new("RGB", (256, 256), colour).save(os.path.join(os.environ["DATA"], f"{i}.png"))
    open(os.path.join(os.environ["DATA"], f"{i}.txt"), "w").write(f"a {name} square, plain, flat, simple")
PY

# 6. the preset: pyramid noise, min-SNR on the v-prediction schedule, caption dropout, adamw8bit, sdpa
cat > ed2-preset.toml <<'TOML'
[[noise]]
type = "pyramid"
discount = 0.8

[loss_weighting]
type = "min_snr"
gamma = 5.0

[[caption]]
type = "dropout"
rate = 0.5

[optimizer]
type = "adamw8bit"
lr = 1e-4

[attention]
type = "sdpa"
TOML

# 7. EveryDream2's configs: train.json names the plugin and the preset; optimizer.json needs its "doc" key
cat > "$ED2/sdplug-train.json" <<JSON
{
  "plugins": ["sdplug.hosts.everydream.Plugin"],
  "sdplug_preset": "$HERE/ed2-preset.toml",
  "resume_ckpt": "$HERE/tiny-model",
  "data_root": "$HERE/data",
  "logdir": "$HERE/logs",
  "project_name": "sdplug",
  "resolution": 256,
  "batch_size": 2,
  "max_epochs": 1,
  "seed": 555,
  "disable_amp": true,
  "no_save_ckpt": true,
  "save_every_n_epochs": 0,
  "ckpt_every_n_minutes": 1000,
  "sample_steps": 100000,
  "log_step": 1,
  "optimizer_config": "sdplug-optimizer.json"
}
JSON
cat > "$ED2/sdplug-optimizer.json" <<'JSON'
{
  "doc": {"base": "EveryDream2 reads this; the sdplug preset's [optimizer] replaces it"},
  "base": {"optimizer": "adamw8bit", "lr": 1e-6, "lr_scheduler": "constant", "lr_decay_steps": null,
           "lr_warmup_steps": null, "betas": [0.9, 0.999], "epsilon": 1e-8, "weight_decay": 0.01},
  "text_encoder_overrides": {"optimizer": null, "lr": 5e-7, "lr_scheduler": "constant", "lr_decay_steps": null,
                             "lr_warmup_steps": null, "betas": null, "epsilon": null, "weight_decay": null},
  "text_encoder_freezing": {"unfreeze_last_n_layers": null},
  "apply_grad_scaler_step_tweaks": true
}
JSON

# 8. train 2 steps (torchvision: the stub on PYTHONPATH); audit.json lands in EveryDream2's log folder
cd "$ED2"
PYTHONPATH="$HERE/stubs" WANDB_MODE=disabled "$HERE/venv/bin/python" train.py --config sdplug-train.json
AUDIT=$(ls -t "$HERE"/logs/*/audit.json | head -1)
echo "audit: $AUDIT"

# 9. the patch route: train.py takes the preset's [loss] (pseudo-Huber, snr schedule), with generalized
#    offset noise (time-dependent: drawn after the timesteps) beside pyramid noise; the plugin is
#    loaded by --sdplug_preset alone (this train.json lists none); unpatch restores train.py byte for byte
cat > "$HERE/ed2-loss-preset.toml" <<'TOML'
[[noise]]
type = "pyramid"
discount = 0.8

[[noise]]
type = "generalized_offset"
strength = 0.1

[loss]
type = "pseudo_huber"
c = 0.1
schedule = "snr"

[loss_weighting]
type = "min_snr"
gamma = 5.0

[[caption]]
type = "dropout"
rate = 0.5

[optimizer]
type = "adamw8bit"
lr = 1e-4
TOML
"$HERE/venv/bin/python" - "$ED2/sdplug-train.json" "$ED2/sdplug-train-patched.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
for key in ("plugins", "sdplug_preset"):
    config.pop(key)
config["project_name"] = "sdplug-patched"
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
BEFORE=$(sha256sum train.py | cut -d' ' -f1)
"$HERE/venv/bin/sdplug" patch everydream "$ED2"
trap '"$HERE/venv/bin/sdplug" unpatch everydream "$ED2"' EXIT
PYTHONPATH="$HERE/stubs" WANDB_MODE=disabled "$HERE/venv/bin/python" train.py --config sdplug-train-patched.json \
  --sdplug_preset "$HERE/ed2-loss-preset.toml"
echo "audit: $(ls -t "$HERE"/logs/sdplug-patched*/audit.json | head -1)"
trap - EXIT
"$HERE/venv/bin/sdplug" unpatch everydream "$ED2"
[ "$(sha256sum train.py | cut -d' ' -f1)" = "$BEFORE" ] && echo "train.py restored byte for byte ($BEFORE)"
