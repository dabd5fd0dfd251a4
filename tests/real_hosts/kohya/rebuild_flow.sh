#!/usr/bin/env bash
# Run kohya sd-scripts' flow-matching LoRA scripts -- flux_train_network.py, sd3_train_network.py,
# lumina_train_network.py, anima_train_network.py and hunyuan_image_train_network.py, unmodified --
# for a few steps on CPU, with
# random-weight models built offline at the real models' fixed widths, plainly, through
# `python -m sdplug kohya --preset`, or patched on disk (`sdplug patch kohya`).
# CPU only, offline except for package registries (pip). Idempotent: re-running skips what is
# already built (tree, venv, models, tokenizers) and always rebuilds/reinstalls the sdplug wheel.
#
# Usage:
#   bash rebuild_flow.sh                 # flux + sd3, RUN=sdplug
#   bash rebuild_flow.sh flux            # one script (flux | sd3 | lumina | anima | hunyuan_image)
#   bash rebuild_flow.sh lumina anima    # Lumina 2 (Gemma2) and Anima (Qwen3): only their models are built
#   bash rebuild_flow.sh hunyuan_image   # HunyuanImage-2.1: ~45 GB of models, ~20 GiB of memory (see Memory)
#   RUN=plain bash rebuild_flow.sh       # kohya alone: $VENV/bin/python flux_train_network.py ...
#   RUN=both bash rebuild_flow.sh        # plain, then sdplug, for each script
#   RUN=patch bash rebuild_flow.sh       # sdplug patch kohya, the script with --sdplug_preset, unpatch (bytes checked)
#   RUN=all bash rebuild_flow.sh         # plain, sdplug, patch
#   RUN=none bash rebuild_flow.sh        # build only
#
# Environment knobs (defaults in brackets):
#   KINT    [./sdplug-real-hosts/kohya]  work folder (the same as rebuild.sh's); everything is written under it
#   SNAP    [this checkout]  the sdplug source whose wheel is installed into venv-main (read only: copied)
#   REBUILD [auto]  auto: `RUN_TESTS=0 bash rebuild.sh main` only when $KINT/sd-main or
#                   $KINT/venv-main is missing (rebuild.sh clones its mirror from GitHub when
#                   $KINT/sd-scripts.git is absent); 1: always; 0: never (the tree and venv must exist)
#   RUN     [sdplug]  plain | sdplug | patch | both | all | none
#   PRESET  [per script]  the preset of RUN=sdplug / patch (a file or a shipped preset's name) for every
#                   script; unset: flow_preset.toml for flux and sd3 (CLIP-L and T5-XXL dropped apart),
#                   flow_preset_one_encoder.toml for lumina and anima (a whole-caption dropout: they
#                   have neither encoder), flow_preset_hunyuan.toml for hunyuan_image (Qwen2.5-VL and
#                   byT5 dropped apart; 1x1 patches for the dynamic shift)
#   STEPS   [2]    --max_train_steps
#   RES     [256]  --resolution (square; bucketing off: the data is 256x256)
#   BATCH   [1]    --train_batch_size
#   T5_LEN  [64]   --t5xxl_max_token_length (flux, sd3); also lumina's --gemma2_max_token_length and
#                  anima's --qwen3_max_token_length and --t5_max_token_length
#   EXTRA   []     more script arguments, appended as they are (word-split)
#   HELPERS [the dir of this script]  make_flux_model.py, make_sd3_model.py, make_lumina_model.py,
#                                     make_anima_model.py, make_hunyuan_model.py, make_flow_tokenizers.py,
#                                     make_gemma_tokenizer.py, make_hunyuan_tokenizers.py,
#                                     make_tokenizer.py, make_data.py; stub: ../torchvision-stub
#
# Layout under $KINT (beside rebuild.sh's):
#   sd-main/ venv-main/      rebuild.sh's tree (sd-scripts main 48d368fa) and its venv
#   flow-src/ flow-wheels/   the copy of $SNAP and the sdplug wheel built from it
#   model-flux/              flux1-dev-tiny.safetensors (FLUX.1-dev width, 1 double + 1 single block,
#                            bf16), ae.safetensors, clip_l.safetensors, t5xxl.safetensors (full T5-XXL,
#                            bf16, 9.5 GB)
#   model-sd3/               sd3-tiny.safetensors (MMDiT depth 2 + VAE), clip_l, clip_g, and
#                            t5xxl.safetensors -> ../model-flux/t5xxl.safetensors (a link)
#   model-lumina/            lumina2.safetensors (NextDiT 2B at its full, fixed size: sd-scripts has no
#                            smaller config; fp8 on disk, 2.4 GiB), gemma2-2b.safetensors (full Gemma-2-2B,
#                            bf16, 4.9 GiB), ae.safetensors (-> ../model-flux/ae.safetensors when that
#                            exists, else written)
#   model-anima/             anima.safetensors (Cosmos-Predict2 2B DiT + LLM adapter, full and fixed;
#                            fp8 on disk, 1.9 GiB), qwen3-0.6b.safetensors (full Qwen3-0.6B, bf16,
#                            1.1 GiB), qwen-image-vae.safetensors (full, bf16, 0.24 GiB)
#   model-hunyuan/           hunyuan_image_2.1.safetensors (the 17.4 B DiT, full and fixed; bf16 on disk,
#                            34.9 GB, because --fp8_scaled quantises as it loads and refuses fp8 input),
#                            qwen2.5-vl-7b.safetensors (full, with vision tower and lm_head; fp8 on disk,
#                            7.7 GiB, cast to bf16 as it loads), byt5.safetensors, vae.safetensors
#   tokcache-flow/           openai_clip-vit-large-patch14, laion_CLIP-ViT-bigG-14-laion2B-39B-b160k,
#                            google_t5-v1_1-xxl (what --tokenizer_cache_dir reads through kohya's
#                            _load_tokenizer), models--google--gemma-2-2b (a hub-cache layout: Lumina
#                            calls AutoTokenizer.from_pretrained(id, cache_dir=--tokenizer_cache_dir),
#                            resolved offline with HF_HUB_OFFLINE=1). Anima needs none: with --qwen3 a
#                            file, it reads the tree's bundled configs/qwen3_06b and configs/t5_old.
#                            HunyuanImage's Qwen_Qwen2.5-VL-7B-Instruct and google_byt5-small, in both
#                            layouts (its model loaders ask the hub by id: HF_HUB_CACHE points here).
#   data-flow/1_sks/         4 images 256x256 + .txt captions (its own copy: the scripts write
#                            *_flux_te.npz / *_sd3_te.npz / *_lumina_te.npz / *_anima_te.npz next to
#                            the images)
#   out-<script>-<run>/      each run's LoRA (and audit.json for RUN=sdplug), emptied before the run
#   logs/flow-*.txt          one log per step and run
#
# Memory: every run is --mixed_precision bf16 (T5-XXL is loaded at full size: ~9.5 GB in bf16,
# ~19 GB in fp32), peaks ~9.5 GiB (FLUX), ~11.2 GiB (SD3: CLIP-G and T5 together while caching),
# ~10.5-10.8 GiB (Lumina: the 2B DiT and Gemma2 together while caching; --disable_mmap_load_safetensors
# casts the fp8 DiT tensor by tensor), ~8.9-9.3 GiB (Anima: Qwen3 + VAE, then the DiT) and, for
# HunyuanImage, Qwen2.5-VL in bf16 (16.6 GB) while caching, then the DiT quantised to fp8 as it loads
# (--fp8_scaled: ~19.5 GB with its fp32 rest) with --gradient_checkpointing (without it autograd keeps
# every layer's dequantised bf16 weight, 35 GB): peak 23.1 GiB measured, so a 24 GiB machine with
# nothing else running, OMP_NUM_THREADS=2, RES=128 and BATCH=1.
# Disk: ~13 GB of models for flux + sd3, ~11.4 GB for lumina + anima, ~45 GB for hunyuan_image.
# Time (OMP_NUM_THREADS=1, batch 2, 256 px, 3 steps): ~4.4 s/step FLUX, ~19-22 s/step Lumina,
# ~13-15 s/step Anima (SD3's tiny MMDiT: well under 1 s); a run takes 0.5-1.7 minutes of wall time.
# HunyuanImage (OMP_NUM_THREADS=2, batch 1, 128 px, 2 steps): ~150 s/step, ~19 minutes of wall time,
# 11 of them the fp16 VAE caching 4 latents the first time (--cache_latents_to_disk keeps them).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # shared 2-core machine (HunyuanImage: 2, alone on it)
export PIP_DISABLE_PIP_VERSION_CHECK=1
export TOKENIZERS_PARALLELISM=false  # kohya's dataloader forks after tokenizing
export HF_HUB_OFFLINE=1           # Lumina's tokenizer comes from a hub-cache folder; transformers 4.54 goes
                                  # to the hub first (and fails) unless offline

SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KINT=${KINT:-$PWD/sdplug-real-hosts/kohya}
SNAP=${SNAP:-$(cd "$SCRIPTS/../../.." && pwd)}
REBUILD=${REBUILD:-auto}
RUN=${RUN:-sdplug}
PRESET=${PRESET:-}  # unset: per script (preset_for)
STEPS=${STEPS:-2}
RES=${RES:-256}
BATCH=${BATCH:-1}
T5_LEN=${T5_LEN:-64}
EXTRA=${EXTRA:-}
HELPERS=${HELPERS:-$SCRIPTS}
STUB=${STUB:-$SCRIPTS/../torchvision-stub}
TREE=$KINT/sd-main
VENV=$KINT/venv-main
mkdir -p "$KINT/logs"
KINT=$(cd "$KINT" && pwd)  # absolute: the runs cd into the tree
export HF_HUB_CACHE=$KINT/tokcache-flow  # HunyuanImage's model loaders read their tokenizers by hub id

step() { STEP_NAME=$1; STEP_START=$SECONDS; echo "== [$(date +%T)] $1"; }
done_step() { echo "   done in $((SECONDS - STEP_START)) s: $STEP_NAME"; }
quiet_pip() { grep -v -e "is ignored: it is neither a file nor a directory" || true; }  # this machine's pip index noise

for f in make_flux_model.py make_sd3_model.py make_lumina_model.py make_anima_model.py make_hunyuan_model.py \
    make_flow_tokenizers.py make_gemma_tokenizer.py make_hunyuan_tokenizers.py make_tokenizer.py make_data.py; do
    [ -f "$HELPERS/$f" ] || { echo "missing $HELPERS/$f" >&2; exit 2; }; done
[ -f "$STUB/torchvision/transforms/functional.py" ] || { echo "missing $STUB (torchvision stub)" >&2; exit 2; }
STUB=$(cd "$STUB" && pwd)
case $RUN in plain|sdplug|patch|both|all|none) ;; *) echo "RUN=$RUN: plain, sdplug, patch, both, all or none" >&2; exit 2;; esac
WHICH=("$@"); [ ${#WHICH[@]} -eq 0 ] && WHICH=(flux sd3)
for w in "${WHICH[@]}"; do case $w in flux|sd3|lumina|anima|hunyuan_image) ;; *)
    echo "unknown script '$w': flux, sd3, lumina, anima or hunyuan_image" >&2; exit 2;; esac; done
wants() { [[ " ${WHICH[*]} " == *" $1 "* ]]; }
preset_for() {  # which -> the preset of its sdplug / patch runs
    if [ -n "$PRESET" ]; then echo "$PRESET"
    else case $1 in flux|sd3) echo "$SCRIPTS/flow_preset.toml";; hunyuan_image) echo "$SCRIPTS/flow_preset_hunyuan.toml";;
        *) echo "$SCRIPTS/flow_preset_one_encoder.toml";; esac; fi
}

# --- tree + venv: rebuild.sh's (it also installs the sdplug wheel of $SNAP into the venv).
if [ "$REBUILD" = 1 ] || { [ "$REBUILD" = auto ] && ! { [ -f "$TREE/.sdplug-commit" ] && [ -x "$VENV/bin/python" ]; }; }; then
    step "tree + venv: RUN_TESTS=0 bash rebuild.sh main"
    RUN_TESTS=0 KINT=$KINT SNAP=$SNAP bash "$SCRIPTS/rebuild.sh" main > "$KINT/logs/flow-rebuild.txt" 2>&1 || {
        tail -20 "$KINT/logs/flow-rebuild.txt" >&2; echo "rebuild.sh failed: $KINT/logs/flow-rebuild.txt" >&2; exit 1; }
    done_step
fi
[ -f "$TREE/.sdplug-commit" ] && [ -x "$VENV/bin/python" ] || { echo "no $TREE or $VENV: run with REBUILD=1" >&2; exit 2; }
echo "   tree $TREE @ $(cat "$TREE/.sdplug-commit")"

# --- the sdplug wheel of $SNAP into venv-main, non-editable, every run (cheap): built from a COPY
# of $SNAP (pip would write build/ and *.egg-info into the source), from a folder outside $SNAP.
step "sdplug wheel from $SNAP into $VENV"
rm -rf "$KINT/flow-src" "$KINT/flow-wheels" && mkdir -p "$KINT/flow-src" "$KINT/flow-wheels"
if git -C "$SNAP" rev-parse --git-dir > /dev/null 2>&1; then
    git -C "$SNAP" archive HEAD | tar -x -C "$KINT/flow-src"  # its committed files
    echo "   $SNAP @ $(git -C "$SNAP" rev-parse --short HEAD) (committed files only)"
else
    cp -a "$SNAP/." "$KINT/flow-src" && rm -rf "$KINT/flow-src/build" "$KINT"/flow-src/*.egg-info
fi
(cd "$KINT" && "$VENV/bin/pip" wheel -q --no-deps "$KINT/flow-src" -w "$KINT/flow-wheels" 2>&1 | quiet_pip > "$KINT/logs/flow-wheel.txt")
WHEEL=$(ls "$KINT"/flow-wheels/sdplug-*.whl)
(cd "$KINT" && "$VENV/bin/pip" install -q --force-reinstall --no-deps "$WHEEL" 2>&1 | quiet_pip)
SDPLUG_AT=$(cd "$KINT" && "$VENV/bin/python" -c 'import sdplug; print(sdplug.__file__)')
echo "   $WHEEL  sha256 $(sha256sum "$WHEEL" | cut -c1-16); imports $SDPLUG_AT"
case $SDPLUG_AT in *site-packages*) ;; *) echo "venv-main must import the installed wheel, not $SDPLUG_AT" >&2; exit 1;; esac
rm -rf "$KINT/flow-src"
done_step

# --- models (random weights, seed 0), tokenizers, data: only what the chosen scripts read. Each
# helper skips what exists; lumina's and anima's also check every tensor's name and shape against
# the tree's own modules (--check).
helper() {  # log name, filter, helper and its arguments; fails the recipe when the helper fails
    local log=$KINT/logs/flow-make-$1.txt filter=$2; shift 2
    if ! (cd "$KINT" && PYTHONPATH=$STUB "$VENV/bin/python" "$@") > "$log" 2>&1; then
        tail -5 "$log" >&2; echo "$(basename "$1") failed: $log" >&2; exit 1; fi
    grep -E "$filter" "$log" | grep -v '\.partial$' | sed 's/^/   /' || true
}
step "models: ${WHICH[*]}"
if wants flux || wants sd3; then helper flux "OK|exists|Error|error" "$HELPERS/make_flux_model.py" "$KINT/model-flux"; fi
if wants sd3; then helper sd3 "OK|exists|linked|Error|error" "$HELPERS/make_sd3_model.py" "$KINT/model-sd3" --t5 "$KINT/model-flux/t5xxl.safetensors"; fi
if wants lumina; then  # the FLUX AE is Lumina's: linked when make_flux_model.py wrote it
    AE=(); [ -f "$KINT/model-flux/ae.safetensors" ] && AE=(--ae "$KINT/model-flux/ae.safetensors")
    helper lumina "OK|exists|linked|check|Error|error" "$HELPERS/make_lumina_model.py" "$KINT/model-lumina" "${AE[@]}" --check "$TREE"
fi
if wants anima; then helper anima "OK|exists|check|Error|error" "$HELPERS/make_anima_model.py" "$KINT/model-anima" --check "$TREE"; fi
if wants hunyuan_image; then  # the layouts come from the tree's own modules; the loaders' strict loads check them
    helper hunyuan "OK|exists|Error|error" "$HELPERS/make_hunyuan_model.py" "$KINT/model-hunyuan" --tree "$TREE"; fi
done_step
step "tokenizers: $KINT/tokcache-flow"
if wants flux || wants sd3; then helper tokenizers "OK|Error|error" "$HELPERS/make_flow_tokenizers.py" "$KINT/tokcache-flow"; fi
if wants lumina; then helper gemma-tokenizer "OK|Error|error" "$HELPERS/make_gemma_tokenizer.py" "$KINT/tokcache-flow"; fi
if wants hunyuan_image; then helper hunyuan-tokenizers "OK|Error|error" "$HELPERS/make_hunyuan_tokenizers.py" "$KINT/tokcache-flow"; fi
if wants anima; then  # anima_train_network.py reads the tree's bundled tokenizers (--qwen3 a file, no --t5_tokenizer_path)
    for f in configs/qwen3_06b/vocab.json configs/qwen3_06b/merges.txt configs/t5_old/tokenizer.json configs/t5_old/spiece.model; do
        [ -s "$TREE/$f" ] || { echo "missing $TREE/$f (anima's bundled tokenizer)" >&2; exit 1; }; done
    echo "   anima: the tree's bundled configs/qwen3_06b (Qwen3) and configs/t5_old (T5) tokenizers"
fi
done_step
step "data: $KINT/data-flow"
(cd "$KINT" && "$VENV/bin/python" "$HELPERS/make_data.py" "$KINT/data-flow" | sed 's/^/   /')
done_step

# --- the runs
RUNS=(); case $RUN in plain) RUNS=(plain);; sdplug) RUNS=(sdplug);; patch) RUNS=(patch);; both) RUNS=(plain sdplug);;
    all) RUNS=(plain sdplug patch);; none) RUNS=();; esac
if [[ " ${RUNS[*]} " == *" sdplug "* || " ${RUNS[*]} " == *" patch "* ]]; then
    PRESETS=(); for w in "${WHICH[@]}"; do p=$(preset_for "$w"); [[ " ${PRESETS[*]} " == *" $p "* ]] || PRESETS+=("$p"); done
    step "presets ${PRESETS[*]}"
    (cd "$KINT" && "$VENV/bin/python" -m sdplug validate "${PRESETS[@]}" | sed 's/^/   /')
    done_step
fi

script_args() {  # which -> the script's arguments (common + model files + its text length)
    local common=(--train_data_dir "$KINT/data-flow" --caption_extension .txt
        --resolution "$RES" --train_batch_size "$BATCH" --max_train_steps "$STEPS" --seed 0
        --mixed_precision bf16 --sdpa --cache_latents --cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk
        --network_train_unet_only --network_dim 4 --learning_rate 1e-4 --save_model_as safetensors --output_name lora)
    local tok=(--tokenizer_cache_dir "$KINT/tokcache-flow")
    case $1 in
    flux) ARGS=(--pretrained_model_name_or_path "$KINT/model-flux/flux1-dev-tiny.safetensors" --ae "$KINT/model-flux/ae.safetensors"
            --clip_l "$KINT/model-flux/clip_l.safetensors" --t5xxl "$KINT/model-flux/t5xxl.safetensors"
            --network_module networks.lora_flux "${tok[@]}" "${common[@]}" --t5xxl_max_token_length "$T5_LEN");;
    sd3) ARGS=(--pretrained_model_name_or_path "$KINT/model-sd3/sd3-tiny.safetensors" --clip_l "$KINT/model-sd3/clip_l.safetensors"
            --clip_g "$KINT/model-sd3/clip_g.safetensors" --t5xxl "$KINT/model-sd3/t5xxl.safetensors"
            --network_module networks.lora_sd3 "${tok[@]}" "${common[@]}" --t5xxl_max_token_length "$T5_LEN");;
    # --disable_mmap_load_safetensors: the fp8 DiT is read and cast to bf16 tensor by tensor (no whole fp8 copy)
    lumina) ARGS=(--pretrained_model_name_or_path "$KINT/model-lumina/lumina2.safetensors" --gemma2 "$KINT/model-lumina/gemma2-2b.safetensors"
            --ae "$KINT/model-lumina/ae.safetensors" --disable_mmap_load_safetensors
            --network_module networks.lora_lumina "${tok[@]}" "${common[@]}" --gemma2_max_token_length "$T5_LEN");;
    anima) ARGS=(--pretrained_model_name_or_path "$KINT/model-anima/anima.safetensors" --qwen3 "$KINT/model-anima/qwen3-0.6b.safetensors"
            --vae "$KINT/model-anima/qwen-image-vae.safetensors"
            --network_module networks.lora_anima "${common[@]}" --qwen3_max_token_length "$T5_LEN" --t5_max_token_length "$T5_LEN");;
    # --fp8_scaled: the 17.4 B DiT quantised to fp8 as it loads (bf16 would not fit); --gradient_checkpointing:
    # otherwise autograd keeps each layer's dequantised weight; Qwen2.5-VL cast from fp8 to bf16 tensor by tensor;
    # --cache_latents_to_disk: kohya's VAE is fp16, whose convolutions crawl on a CPU (~3 min per 128 px image),
    # so its latents (*_hi.npz, independent of sdplug) are kept for the next run
    hunyuan_image) ARGS=(--pretrained_model_name_or_path "$KINT/model-hunyuan/hunyuan_image_2.1.safetensors"
            --text_encoder "$KINT/model-hunyuan/qwen2.5-vl-7b.safetensors" --byt5 "$KINT/model-hunyuan/byt5.safetensors"
            --vae "$KINT/model-hunyuan/vae.safetensors" --fp8_scaled --gradient_checkpointing --disable_mmap_load_safetensors
            --cache_latents_to_disk
            --network_module networks.lora_hunyuan_image "${tok[@]}" "${common[@]}");;
    esac
    # shellcheck disable=SC2206
    [ -n "$EXTRA" ] && ARGS+=($EXTRA)
    return 0
}

TIMER=(); [ -x /usr/bin/time ] && TIMER=(/usr/bin/time -v)
SUMMARY=()
status=0
for w in "${WHICH[@]}"; do
    script=${w}_train_network.py
    preset=$(preset_for "$w")
    for run in "${RUNS[@]}"; do
        step "$script, RUN=$run, $STEPS steps"
        out=$KINT/out-$w-$run log=$KINT/logs/flow-$w-$run.txt
        rm -rf "$out" && mkdir -p "$out"
        # kohya's disk cache check of the text-encoder outputs looks at the keys and the
        # attention-mask flag, not at the token length or the models: stale caches would be reused.
        rm -f "$KINT"/data-flow/*/*_te.npz "$KINT"/data-flow/*/*_flux.npz "$KINT"/data-flow/*/*_sd3.npz \
            "$KINT"/data-flow/*/*_lumina.npz "$KINT"/data-flow/*/*_anima.npz
        script_args "$w"
        ARGS+=(--output_dir "$out")
        if [ "$run" = plain ]; then CMD=("$VENV/bin/python" "$script" "${ARGS[@]}")
        elif [ "$run" = patch ]; then  # the patch route: the script patched on disk, run as kohya's GUIs run it
            before=$(cd "$TREE" && sha256sum ./*.py | sha256sum | cut -c1-16)
            (cd "$KINT" && "$VENV/bin/python" -m sdplug patch kohya "$TREE" | sed 's/^/   /')
            CMD=("$VENV/bin/python" "$script" "${ARGS[@]}" --sdplug_preset "$preset")
        else CMD=("$VENV/bin/python" -m sdplug kohya --preset "$preset" -- "$script" "${ARGS[@]}"); fi
        echo "   (cd $TREE && PYTHONPATH=$STUB ${CMD[*]})" | tee "$log"
        rc=0
        (cd "$TREE" && PYTHONPATH=$STUB "${TIMER[@]}" "${CMD[@]}") >> "$log" 2>&1 || rc=$?
        if [ "$run" = patch ]; then  # unpatch, and every script's bytes as before
            (cd "$KINT" && "$VENV/bin/python" -m sdplug unpatch kohya "$TREE" | sed 's/^/   /')
            after=$(cd "$TREE" && sha256sum ./*.py | sha256sum | cut -c1-16)
            if [ "$before" = "$after" ]; then echo "   unpatch: every script byte-identical ($after)"
            else echo "   unpatch: scripts differ from before patching ($before -> $after)"; rc=1; fi
        fi
        # s/step: tqdm's last rate on the "steps" bar; peak RSS from /usr/bin/time -v
        rate=$(grep -o 'steps: 100%[^]]*\]' "$log" | tail -1 | grep -oE '[0-9.]+(s/it|it/s)' | tail -1 || true)
        case $rate in *it/s) sps=$(awk -v r="${rate%it/s}" 'BEGIN {printf "%.2f", 1 / r}');; *s/it) sps=${rate%s/it};; *) sps=?;; esac
        rss=$(awk '/Maximum resident set size/ {printf "%.2f", $NF / 1048576}' "$log"); rss=${rss:-?}
        wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$log"); wall=${wall:-?}
        result=pass; { [ $rc -ne 0 ] || [ ! -f "$out/lora.safetensors" ]; } && { result=FAIL; status=1; }
        echo "   $result (exit $rc): $sps s/step, peak RSS $rss GiB, wall $wall; log $log"
        if [ $rc -ne 0 ]; then grep -E "Error|error|refuse" "$log" | tail -8 | sed 's/^/   | /'; fi
        if [ "$run" != plain ] && [ -f "$out/audit.json" ]; then
            sed -n '/^sdplug: audit/,/^  problems/p' "$log" | sed 's/^/   /'
            "$VENV/bin/python" - "$out/audit.json" << 'EOF' | sed 's/^/   /'
import json, sys
a = json.load(open(sys.argv[1]))
host = a.get("host", {})
print("completed:", a.get("completed"), "| problems:", a.get("problems") or "none")
for rule in host.get("rules", []):
    print("rule:", rule)
for flag, how in host.get("kohya_flags", {}).items():
    print(f"--{flag}: {how}")
if host.get("unclassified_flags"):
    print("unclassified:", " ".join("--" + f for f in host["unclassified_flags"]))
EOF
        elif [ "$run" != plain ]; then echo "   no $out/audit.json"; status=1; fi
        SUMMARY+=("$(printf '%-24s %-7s %-5s %8s s/step %7s GiB  %s' "$script" "$run" "$result" "$sps" "$rss" "${out}")")
        done_step
    done
done
rm -f "$KINT"/data-flow/*/*_te.npz  # leave no stale text-encoder cache behind

if [ ${#SUMMARY[@]} -gt 0 ]; then
    echo "== summary (sdplug wheel $(basename "$WHEEL"), tree $(cut -c1-8 "$TREE/.sdplug-commit"))"
    printf '   %s\n' "${SUMMARY[@]}"
fi
exit $status
