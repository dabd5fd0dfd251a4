#!/usr/bin/env bash
# Rebuild, from nothing, the environment that runs sdplug's real-host integration tests
# (tests/hosts/test_kohya.py + tests/hosts/test_kohya_flags.py, `-k real_sd_scripts`) against real kohya
# sd-scripts trees, with sdplug installed from a WHEEL (non-editable) on the kohya side; then
# run them. CPU only, offline except for package registries (pip). Idempotent: re-running skips
# what is already built (trees, venvs, model) and always rebuilds/reinstalls the sdplug wheel.
#
# Usage:
#   bash rebuild.sh                      # both default trees: main v087
#   bash rebuild.sh main                 # one tree
#   bash rebuild.sh mytree=<commit>      # any other commit of the mirror (main-style pins)
#   RUN_TESTS=0 bash rebuild.sh          # build only
#
# Known trees (name -> commit, extra pins):
#   main  48d368fa557731ad0488c07304dfeba8c07910eb  torch==2.13.0
#   v087  bfb352bc433326a77aca3124248331eb60c49e8c  torch==2.13.0, numpy<2 (opencv 4.7 pin),
#         bitsandbytes 0.50.2 instead of the tree's 0.43.0 pin; NO peft (diffusers 0.25 would
#         import it, and current peft needs a newer huggingface_hub than v0.8.7 pins).
#
# Environment knobs (defaults in brackets):
#   KINT   [./sdplug-real-hosts/kohya]  work folder; everything is written under it
#   SNAP   [this checkout]  the sdplug source to test (read only: it is copied before building)
#   MIRROR [$KINT/sd-scripts.git, cloned bare from $SD_SCRIPTS_GIT]  a bare git repo of kohya-ss/sd-scripts
#   SD_SCRIPTS_GIT [https://github.com/kohya-ss/sd-scripts.git]
#   TORCH  [2.13.0]      torch version installed FIRST in every venv and pinned afterwards
#   PY     [python3]     the interpreter the venvs are made from
#   HELPERS [the dir of this script]  make_tokenizer.py, make_model.py, make_data.py (stub: ../torchvision-stub)
#
# Layout under $KINT:
#   sd-<name>/             work tree (git archive of the commit; .sdplug-commit records it)
#   venv-<name>/           the tree's venv: torch, the tree's requirements, the sdplug wheel
#   venv-runner/           pytest's venv: torch, sdplug wheel [train,dev,bnb] under $SNAP/.ci/constraints.txt
#   constraints/           the pins used (<name>.txt, rewritten requirements, frozen installed-<name>.txt)
#   wheels/                sdplug-*.whl built from a copy of $SNAP (src/)
#   (next to this script) helpers/: torchvision-stub/ + make_tokenizer.py / make_model.py / make_data.py
#   tokcache-<name>/openai_clip-vit-large-patch14   tokenizer written with that venv's transformers
#   model-sd15/            random-weight SD 1.5-size diffusers folder (v_prediction), shared
#   data/1_sks/            4 images 256x256 + .txt captions
#   tests-copy/tests/      copy of $SNAP/tests (the tests import tests.hosts.kohya_standin etc.)
#   run/                   pytest's working directory (outside $SNAP)
#   logs/                  one log per step
set -euo pipefail
export OMP_NUM_THREADS=1          # shared 2-core machine
export PIP_DISABLE_PIP_VERSION_CHECK=1

SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KINT=${KINT:-$PWD/sdplug-real-hosts/kohya}
SNAP=${SNAP:-$(cd "$SCRIPTS/../../.." && pwd)}
MIRROR=${MIRROR:-$KINT/sd-scripts.git}
if [ ! -d "$MIRROR" ]; then git clone -q --bare "${SD_SCRIPTS_GIT:-https://github.com/kohya-ss/sd-scripts.git}" "$MIRROR"; fi
TORCH=${TORCH:-2.13.0}
PY=${PY:-python3}
RUN_TESTS=${RUN_TESTS:-1}
HELPERS=${HELPERS:-$SCRIPTS}  # next to this script
STUB=${STUB:-$SCRIPTS/../torchvision-stub}
mkdir -p "$KINT"/{constraints,wheels,logs,run}

step() { STEP_NAME=$1; STEP_START=$SECONDS; echo "== [$(date +%T)] $1"; }
done_step() { echo "   done in $((SECONDS - STEP_START)) s: $STEP_NAME"; }
quiet_pip() { grep -v -e "is ignored: it is neither a file nor a directory" || true; }  # this machine's pip index noise

[ -f "$HELPERS/make_model.py" ] && [ -f "$STUB/torchvision/transforms/functional.py" ] || {
    echo "missing $HELPERS (make_tokenizer.py, make_model.py, make_data.py, torchvision-stub/)" >&2; exit 2; }

# --- sdplug wheel: built from a COPY of $SNAP (pip builds in-tree and would write build/ and
# *.egg-info into the source), every run (cheap), so the wheel always matches $SNAP.
step "sdplug wheel from $SNAP"
rm -rf "$KINT/src" "$KINT"/wheels/sdplug-*.whl && mkdir -p "$KINT/src"
if git -C "$SNAP" rev-parse --git-dir > /dev/null 2>&1; then
    git -C "$SNAP" archive HEAD | tar -x -C "$KINT/src"  # a checkout: its committed files (no .venv, no build/)
else
    cp -a "$SNAP/." "$KINT/src" && rm -rf "$KINT/src/build" "$KINT"/src/*.egg-info
fi
$PY -m pip wheel --no-deps "$KINT/src" -w "$KINT/wheels" 2>&1 | quiet_pip > "$KINT/logs/wheel.txt"
WHEEL=$(ls "$KINT"/wheels/sdplug-*.whl)
echo "   $WHEEL  sha256 $(sha256sum "$WHEEL" | cut -c1-16)"
done_step

# --- tree: git archive of COMMIT from the bare mirror. The mirror lacks a few blobs (Windows
# bitsandbytes DLLs, configs/qwen3_06b/tokenizer.json on main); they are excluded by pathspec.
make_tree() {  # name commit
    local name=$1 commit=$2 dir=$KINT/sd-$1
    step "tree $name @ $commit"
    if [ -f "$dir/.sdplug-commit" ] && [ "$(cat "$dir/.sdplug-commit")" = "$commit" ]; then
        echo "   exists: $dir"; done_step; return; fi
    git --git-dir="$MIRROR" cat-file -e "$commit^{commit}" || {
        echo "commit $commit is not in $MIRROR: git --git-dir=$MIRROR fetch origin first" >&2; exit 2; }
    local excludes=()
    while read -r path; do excludes+=(":(exclude)$path"); done < <(
        git --git-dir="$MIRROR" ls-tree -r "$commit" | awk '$2 == "blob" {print $3}' |
        git --git-dir="$MIRROR" cat-file --batch-check='%(objectname) %(objecttype)' | awk '$2 == "missing" {print $1}' |
        while read -r sha; do git --git-dir="$MIRROR" ls-tree -r "$commit" | awk -v s="$sha" '$3 == s {print $4}'; done)
    [ ${#excludes[@]} -gt 0 ] && echo "   blobs missing from the mirror, left out: ${excludes[*]}"
    rm -rf "$dir" "$dir.partial" && mkdir -p "$dir.partial"
    git --git-dir="$MIRROR" archive "$commit" -- . "${excludes[@]}" 2>/dev/null | tar -x -C "$dir.partial"
    echo "$commit" > "$dir.partial/.sdplug-commit"
    mv "$dir.partial" "$dir"
    done_step
}

# --- the tree's venv: torch FIRST, then the tree's requirements.txt under constraints pinning
# torch (and, for v087, numpy<2 + bitsandbytes 0.50.2), then the sdplug wheel non-editable and
# only its missing runtime deps, under a freeze of everything installed (nothing moves).
make_venv() {  # name
    local name=$1 dir=$KINT/sd-$1 venv=$KINT/venv-$1 con=$KINT/constraints/$1.txt req=$KINT/sd-$1/requirements.txt
    step "venv $name"
    printf 'torch==%s\n' "$TORCH" > "$con"
    if [ "$name" = v087 ]; then
        printf 'numpy<2\nbitsandbytes==0.50.2\n' >> "$con"
        # the tree pins bitsandbytes==0.43.0, which would contradict the constraint: rewrite that line
        sed -E 's/^bitsandbytes==0\.43\.0$/bitsandbytes==0.50.2/' "$dir/requirements.txt" > "$KINT/constraints/requirements-$name.txt"
        req=$KINT/constraints/requirements-$name.txt
    fi
    if grep -qiE '^\s*torch([=<>~! ]|$)' "$req"; then  # a torch pin would replace torch: drop it
        grep -viE '^\s*torch([=<>~! ]|$)' "$req" > "$KINT/constraints/requirements-$name.txt.tmp"
        mv "$KINT/constraints/requirements-$name.txt.tmp" "$KINT/constraints/requirements-$name.txt"; req=$KINT/constraints/requirements-$name.txt
    fi
    local stamp; stamp=$(cat "$con" "$req" "$dir/.sdplug-commit" | sha256sum | cut -c1-16)
    if [ -f "$venv/.sdplug-stamp" ] && [ "$(cat "$venv/.sdplug-stamp")" = "$stamp" ]; then
        echo "   requirements already installed: $venv"
    else
        rm -rf "$venv" && $PY -m venv "$venv"
        "$venv/bin/pip" install -q "torch==$TORCH" 2>&1 | quiet_pip
        (cd "$dir" && "$venv/bin/pip" install -q -c "$con" -r "$req" 2>&1 | quiet_pip)  # `-e .` is relative to cwd
        echo "$stamp" > "$venv/.sdplug-stamp"
    fi
    "$venv/bin/pip" uninstall -q -y sdplug 2>/dev/null || true
    "$venv/bin/pip" freeze --exclude-editable --exclude sdplug > "$KINT/constraints/installed-$name.txt"
    "$venv/bin/pip" install -q --force-reinstall --no-deps "$WHEEL" 2>&1 | quiet_pip
    # pulls only what sdplug needs and is missing (pydantic, annotated-types, tomli-w, ...):
    "$venv/bin/pip" install -q -c "$KINT/constraints/installed-$name.txt" -c "$con" "$WHEEL" 2>&1 | quiet_pip
    "$venv/bin/pip" check 2>&1 | quiet_pip
    if [ "$name" = v087 ] && "$venv/bin/python" -c "import peft" 2>/dev/null; then echo "peft is installed in $venv: remove it" >&2; exit 2; fi
    "$venv/bin/pip" freeze | grep -iE '^(torch|accelerate|transformers|diffusers|numpy|bitsandbytes|huggingface.hub|safetensors|pydantic|sdplug)([=@ ]|$)' | sed 's/^/   /'
    done_step
}

# --- tokenizer: written as vocab.json/merges.txt by hand (a folder saved by transformers 5 may
# not load in transformers 4.36), then loaded back with THIS venv's CLIPTokenizer.
make_tokenizer() {  # name
    step "tokenizer $1"
    (cd "$KINT/run" && "$KINT/venv-$1/bin/python" "$HELPERS/make_tokenizer.py" \
        "$KINT/tokcache-$1/openai_clip-vit-large-patch14" 2>&1 | grep -E "OK|Error|error" )
    done_step
}

# --- runner venv (pytest + sdplug's test deps, from the same wheel, CI's pins).
make_runner() {
    local venv=$KINT/venv-runner con=$KINT/src/.ci/constraints.txt
    step "runner venv"
    [ -f "$con" ] || { echo "$con missing" >&2; exit 2; }
    local stamp; stamp=$(sha256sum "$con" | cut -c1-16)
    if ! { [ -f "$venv/.sdplug-stamp" ] && [ "$(cat "$venv/.sdplug-stamp")" = "$stamp" ]; }; then
        rm -rf "$venv" && $PY -m venv "$venv"
        "$venv/bin/pip" install -q "torch==$TORCH" 2>&1 | quiet_pip
        echo "$stamp" > "$venv/.sdplug-stamp"
    fi
    "$venv/bin/pip" install -q -c "$con" "$WHEEL[train,dev,bnb]" 2>&1 | quiet_pip
    "$venv/bin/pip" install -q --force-reinstall --no-deps "$WHEEL" 2>&1 | quiet_pip
    "$venv/bin/pip" check 2>&1 | quiet_pip
    done_step
}

# --- parse the tree arguments
TREES=("$@"); [ ${#TREES[@]} -eq 0 ] && TREES=(main v087)
declare -A COMMIT=([main]=48d368fa557731ad0488c07304dfeba8c07910eb [v087]=bfb352bc433326a77aca3124248331eb60c49e8c)
NAMES=()
for t in "${TREES[@]}"; do
    name=${t%%=*}; [ "$t" != "$name" ] && COMMIT[$name]=${t#*=}
    [ -n "${COMMIT[$name]:-}" ] || { echo "unknown tree '$name': give $name=<commit>" >&2; exit 2; }
    NAMES+=("$name")
done

make_runner
for name in "${NAMES[@]}"; do
    make_tree "$name" "${COMMIT[$name]}"
    make_venv "$name"
    make_tokenizer "$name"
done

# --- model (random weights, SD 1.5 shapes) and data: built once, with the oldest venv's
# diffusers if v087 is present (its format is read by newer diffusers too).
step "model + data"
MODEL_VENV=$KINT/venv-${NAMES[-1]}; [ -d "$KINT/venv-v087" ] && MODEL_VENV=$KINT/venv-v087
MODEL_TOK=$KINT/tokcache-$(basename "$MODEL_VENV" | sed 's/^venv-//')/openai_clip-vit-large-patch14
(cd "$KINT/run" && "$MODEL_VENV/bin/python" "$HELPERS/make_model.py" "$KINT/model-sd15" "$MODEL_TOK" 2>&1 | grep -E "OK|exists|Error|error")
(cd "$KINT/run" && "$MODEL_VENV/bin/python" "$HELPERS/make_data.py" "$KINT/data")
done_step

# --- the tests: a fresh copy of $SNAP/tests (folder name kept: they import tests.hosts.kohya_standin),
# run from $KINT/run (outside $SNAP), sdplug from the runner venv's wheel; the kohya side runs
# $SDPLUG_KOHYA_PYTHON -m sdplug from the tree venv's wheel. PYTHONPATH: the `tests` package and
# the torchvision stub (the kohya subprocess inherits it).
rm -rf "$KINT/tests-copy" && mkdir -p "$KINT/tests-copy" && cp -a "$KINT/src/tests" "$KINT/tests-copy/tests"
status=0
if [ "$RUN_TESTS" = 1 ]; then
    for name in "${NAMES[@]}"; do
        step "pytest real_sd_scripts on $name"
        echo "   kohya side sdplug: $(cd /tmp && "$KINT/venv-$name/bin/python" -c 'import sdplug; print(sdplug.__file__)')"
        echo "   runner sdplug:     $(cd /tmp && "$KINT/venv-runner/bin/python" -c 'import sdplug; print(sdplug.__file__)')"
        (
            cd "$KINT/run"
            export PYTHONPATH="$KINT/tests-copy:$STUB"
            export SDPLUG_KOHYA_DIR="$KINT/sd-$name" SDPLUG_KOHYA_PYTHON="$KINT/venv-$name/bin/python"
            export SDPLUG_KOHYA_ARGS="--pretrained_model_name_or_path $KINT/model-sd15 --train_data_dir $KINT/data --resolution 256 --train_batch_size 1 --tokenizer_cache_dir $KINT/tokcache-$name --v_parameterization --caption_extension .txt"
            # what the kohya subprocess imports, with the tests' exact environment and cwd:
            "$SDPLUG_KOHYA_PYTHON" -c 'import sys, sdplug, sdplug.hosts.kohya.launcher as l; print("kohya-side sdplug:", sdplug.__file__, l.__file__); assert "site-packages" in sdplug.__file__, "the kohya side must import the installed wheel"'
            "$KINT/venv-runner/bin/python" -m pytest "$KINT/tests-copy/tests/hosts/test_kohya.py" "$KINT/tests-copy/tests/hosts/test_kohya_flags.py" \
                -k real_sd_scripts -v -rA --durations=0 -p no:cacheprovider
        ) > "$KINT/logs/pytest-$name.txt" 2>&1 || status=1
        grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$KINT/logs/pytest-$name.txt" | grep -v "^PASSED\|^SKIPPED\|^FAILED" | sed 's/^/   /'
        done_step
    done
fi
exit $status
