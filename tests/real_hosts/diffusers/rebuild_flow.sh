#!/usr/bin/env bash
# diffusers' flow-matching DreamBooth LoRA example scripts on CPU, unmodified: train_dreambooth_lora_flux.py,
# train_dreambooth_lora_flux2.py, train_dreambooth_lora_sd3.py, train_dreambooth_lora_qwen_image.py,
# train_dreambooth_lora_z_image.py and train_dreambooth_lora_lumina2.py, 2 steps each on tiny random-weight
# pipelines built offline by make_tiny_flow.py (diffusers' own test-suite configs, tokenizers trained here).
# The examples used: diffusers main 58eb52c080 (2026-08-23), run against diffusers 0.42.1 from pip.
#   WORK          [./sdplug-real-hosts/diffusers]  where everything is built (shared with rebuild.sh)
#   SDPLUG        [this checkout]
#   RUN           [sdplug]  sdplug: each script through `python -m sdplug diffusers --preset PRESET -- SCRIPT ...`;
#                           plain: `python SCRIPT ...` (the scripts as diffusers ships them)
#   PRESET        [flow_preset.toml next to this file]  the preset RUN=sdplug uses
#   PRESET_TWO_ENCODERS [flow_preset_two_encoders.toml next to this file]  the one FLUX.1 and SD3 use
#   KINDS         [flux flux2 sd3 qwen_image z_image lumina2]  which scripts to run
#   DIFFUSERS_GIT [https://github.com/huggingface/diffusers.git]  a checkout or URL; COMMIT [58eb52c080]
# The venv, the diffusers checkout and the instance images are rebuild.sh's: the same lines as there, each skipped
# when its result exists, so after rebuild.sh this only builds $WORK/tiny-flow/<kind> and runs (and alone it also
# works). The sdplug wheel is rebuilt and reinstalled only for RUN=sdplug.
# Known limits of the scripts on CPU (not worked around here: no prior preservation is used):
#   - train_dreambooth_lora_qwen_image.py --with_prior_preservation samples missing class images with
#     QwenImagePipeline in float16 (bfloat16 with --mixed_precision bf16) whatever the device; on CPU that runs
#     for minutes per image (no result within 90 s on the tiny model). Fill --class_data_dir with
#     >= --num_class_images images first and it trains.
#   - train_dreambooth_lora_lumina2.py --with_prior_preservation fails in the first step (IndexError in
#     Lumina2RotaryPosEmbed): the instance+class prompt embeddings (2 rows) are repeated by len(prompts) again.
set -euo pipefail
export OMP_NUM_THREADS=1
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SDPLUG=${SDPLUG:-$(cd "$SCRIPTS/../../.." && pwd)}
D=${WORK:-$PWD/sdplug-real-hosts/diffusers}
RUN=${RUN:-sdplug}
PRESET=${PRESET:-$SCRIPTS/flow_preset.toml}
PRESET_TWO_ENCODERS=${PRESET_TWO_ENCODERS:-$SCRIPTS/flow_preset_two_encoders.toml}
KINDS=${KINDS:-flux flux2 sd3 qwen_image z_image lumina2}
DIFFUSERS_GIT=${DIFFUSERS_GIT:-https://github.com/huggingface/diffusers.git}
COMMIT=${COMMIT:-58eb52c080}
case "$RUN" in plain | sdplug) ;; *) echo "RUN must be plain or sdplug, not '$RUN'" >&2 && exit 2 ;; esac
mkdir -p "$D" && cd "$D"
# --- as rebuild.sh ---
[ -x venv/bin/python ] || {
  ${PY:-python3} -m venv venv
  venv/bin/pip install -q torch==2.13.0
  venv/bin/pip install -q -c "$SDPLUG/.ci/constraints.txt" diffusers==0.42.1 transformers accelerate peft bitsandbytes \
    safetensors numpy Pillow huggingface-hub tokenizers tqdm packaging pydantic tomli-w annotated-types \
    datasets ftfy Jinja2 tensorboard
}
if [ "$RUN" = sdplug ]; then
  rm -rf wheels && venv/bin/pip wheel -q --no-deps "$SDPLUG" -w wheels
  venv/bin/pip install -q --force-reinstall --no-deps wheels/sdplug-*.whl
fi
[ -d diffusers-src ] || {
  git clone -q "$DIFFUSERS_GIT" diffusers-src
  git -C diffusers-src checkout -q "$COMMIT"
}
# torchvision: its CPU wheel for torch 2.13 cannot import here (torchvision::nms); the stub gives the
# transforms the examples use, on PYTHONPATH for the script's process only
STUB=$SCRIPTS/torchvision-stub
[ -f tiny-sd15/model_index.json ] || PYTHONPATH=$STUB venv/bin/python "$SCRIPTS/make_tiny.py" "$D/tiny-sd15" "$D/data"
mkdir -p db_data && cp data/*.png db_data/
# --- the tiny flow pipelines (each kept once its model_index.json exists) ---
for kind in $KINDS; do
  PYTHONPATH=$STUB HF_HUB_OFFLINE=1 venv/bin/python "$SCRIPTS/make_tiny_flow.py" "$D/tiny-flow" "$kind"
done

run() { # run SCRIPT ARGS...: as diffusers ships it (RUN=plain) or through `sdplug diffusers` (RUN=sdplug);
  # FLUX.1 and SD3 (two text encoders and more) take the preset's per-encoder variant, PRESET_TWO_ENCODERS
  local preset=$PRESET
  case "$1" in train_dreambooth_lora_flux.py | train_dreambooth_lora_sd3.py) preset=$PRESET_TWO_ENCODERS ;; esac
  if [ "$RUN" = plain ]; then
    PYTHONPATH=$STUB HF_HUB_OFFLINE=1 "$D/venv/bin/python" "$@"
  else
    PYTHONPATH=$STUB HF_HUB_OFFLINE=1 "$D/venv/bin/python" -m sdplug diffusers --preset "$preset" -- "$@"
  fi
}
want() { # want KIND: KIND is in $KINDS; sets COMMON to the flags every run shares and clears its output_dir
  case " $KINDS " in *" $1 "*) ;; *) return 1 ;; esac
  rm -rf "$D/runs/$1"
  COMMON=(--pretrained_model_name_or_path "$D/tiny-flow/$1" --instance_data_dir "$D/db_data"
    --instance_prompt "a photo of sks dog" --resolution 32 --train_batch_size 2 --max_train_steps 2
    --output_dir "$D/runs/$1" --seed 0 --rank 4 --report_to tensorboard)
}
# --max_sequence_length: room for the prompt as each pipeline wraps it, and little more (with the tokenizers
# here: T5's "a photo of sks dog</s>" is 6 tokens; Flux2's system message + prompt 37; Qwen-Image's part after
# the dropped template prefix 10; Z-Image's chat-templated prompt 13; Lumina2's system prompt + " <Prompt Start> "
# + prompt 31)
cd diffusers-src/examples/dreambooth
if want flux; then
  run train_dreambooth_lora_flux.py "${COMMON[@]}" --max_sequence_length 16
fi
if want flux2; then # the tiny Mistral3 text encoder has 3 layers: its hidden states 1 2 3, not the default 10 20 30
  run train_dreambooth_lora_flux2.py "${COMMON[@]}" --max_sequence_length 48 --text_encoder_out_layers 1 2 3
fi
if want sd3; then
  run train_dreambooth_lora_sd3.py "${COMMON[@]}" --max_sequence_length 16
fi
if want qwen_image; then
  run train_dreambooth_lora_qwen_image.py "${COMMON[@]}" --max_sequence_length 16
fi
if want z_image; then
  run train_dreambooth_lora_z_image.py "${COMMON[@]}" --max_sequence_length 32
fi
if want lumina2; then
  run train_dreambooth_lora_lumina2.py "${COMMON[@]}" --max_sequence_length 48
fi
echo "runs: $(for kind in $KINDS; do printf '%s ' "$D/runs/$kind"; done)"
