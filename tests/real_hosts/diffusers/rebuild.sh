#!/usr/bin/env bash
# diffusers' example LoRA scripts on CPU with sdplug: a venv (torch first, the rest under sdplug's
# constraints plus what the scripts import), the sdplug wheel installed non-editable, the four
# example scripts from a diffusers checkout, a tiny SD1.5-structured v-prediction model, a tiny
# SDXL-structured v-prediction model and data, then 2 steps each of train_text_to_image_lora.py,
# train_dreambooth_lora.py, train_text_to_image_lora_sdxl.py and train_dreambooth_lora_sdxl.py
# through `sdplug diffusers`. The examples used: diffusers main 58eb52c080 (2026-08-23), run against
# diffusers 0.42.1 from pip.
#   WORK          [./sdplug-real-hosts/diffusers]  where everything is built
#   SDPLUG        [this checkout]
#   DIFFUSERS_GIT [https://github.com/huggingface/diffusers.git]  a checkout or URL; COMMIT [58eb52c080]
set -euo pipefail
export OMP_NUM_THREADS=1
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SDPLUG=${SDPLUG:-$(cd "$SCRIPTS/../../.." && pwd)}
D=${WORK:-$PWD/sdplug-real-hosts/diffusers}
DIFFUSERS_GIT=${DIFFUSERS_GIT:-https://github.com/huggingface/diffusers.git}
COMMIT=${COMMIT:-58eb52c080}
mkdir -p "$D" && cd "$D"
[ -x venv/bin/python ] || {
  ${PY:-python3} -m venv venv
  venv/bin/pip install -q torch==2.13.0
  venv/bin/pip install -q -c "$SDPLUG/.ci/constraints.txt" diffusers==0.42.1 transformers accelerate peft bitsandbytes \
    safetensors numpy Pillow huggingface-hub tokenizers tqdm packaging pydantic tomli-w annotated-types \
    datasets ftfy Jinja2 tensorboard
}
rm -rf wheels && venv/bin/pip wheel -q --no-deps "$SDPLUG" -w wheels
venv/bin/pip install -q --force-reinstall --no-deps wheels/sdplug-*.whl
[ -d diffusers-src ] || {
  if [ -d "$DIFFUSERS_GIT" ]; then git clone -q "$DIFFUSERS_GIT" diffusers-src; else git clone -q "$DIFFUSERS_GIT" diffusers-src; fi
  git -C diffusers-src checkout -q "$COMMIT"
}
# torchvision: its CPU wheel for torch 2.13 cannot import here (torchvision::nms); the stub gives the
# transforms the examples use, on PYTHONPATH for the script's process only
STUB=$SCRIPTS/torchvision-stub
[ -f tiny-sd15/model_index.json ] || PYTHONPATH=$STUB venv/bin/python "$SCRIPTS/make_tiny.py" "$D/tiny-sd15" "$D/data"
[ -f tiny-sdxl/model_index.json ] || PYTHONPATH=$STUB venv/bin/python "$SCRIPTS/make_tiny_sdxl.py" "$D/tiny-sdxl" "$D/tiny-sd15/tokenizer"
# the acceptance preset's min-SNR on a v-prediction schedule for the SDXL scripts too (train_dreambooth_lora_sdxl.py
# has no --prediction_type: the model's scheduler config says it)
venv/bin/python - "$D/tiny-sdxl/scheduler/scheduler_config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["prediction_type"] = "v_prediction"
json.dump(config, open(sys.argv[1], "w"), indent=2)
PY
mkdir -p db_data && cp data/*.png db_data/
cd diffusers-src/examples/text_to_image
PYTHONPATH=$STUB HF_HUB_OFFLINE=1 "$D/venv/bin/python" -m sdplug diffusers --preset "$SCRIPTS/preset.toml" -- train_text_to_image_lora.py \
  --pretrained_model_name_or_path "$D/tiny-sd15" --train_data_dir "$D/data" --resolution 32 --train_batch_size 4 \
  --max_train_steps 2 --output_dir "$D/runs/t2i" --seed 0 --rank 4 --report_to tensorboard
cd ../dreambooth
PYTHONPATH=$STUB HF_HUB_OFFLINE=1 "$D/venv/bin/python" -m sdplug diffusers --preset "$SCRIPTS/preset.toml" -- train_dreambooth_lora.py \
  --pretrained_model_name_or_path "$D/tiny-sd15" --instance_data_dir "$D/db_data" --instance_prompt "a photo of sks dog" \
  --resolution 32 --train_batch_size 4 --max_train_steps 2 --output_dir "$D/runs/db" --seed 0 --rank 4 --report_to tensorboard
PYTHONPATH=$STUB HF_HUB_OFFLINE=1 "$D/venv/bin/python" -m sdplug diffusers --preset "$SCRIPTS/preset.toml" -- train_dreambooth_lora_sdxl.py \
  --pretrained_model_name_or_path "$D/tiny-sdxl" --instance_data_dir "$D/db_data" --instance_prompt "a photo of sks dog" \
  --resolution 32 --train_batch_size 4 --max_train_steps 2 --output_dir "$D/runs/db-sdxl" --seed 0 --rank 4 --report_to tensorboard
cd ../text_to_image
PYTHONPATH=$STUB HF_HUB_OFFLINE=1 "$D/venv/bin/python" -m sdplug diffusers --preset "$SCRIPTS/preset.toml" -- train_text_to_image_lora_sdxl.py \
  --pretrained_model_name_or_path "$D/tiny-sdxl" --train_data_dir "$D/data" --resolution 32 --train_batch_size 4 \
  --max_train_steps 2 --output_dir "$D/runs/t2i-sdxl" --seed 0 --rank 4 --report_to tensorboard
echo "audits: $D/runs/t2i/audit.json $D/runs/db/audit.json $D/runs/db-sdxl/audit.json $D/runs/t2i-sdxl/audit.json"
