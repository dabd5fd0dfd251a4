"""The source patch of each supported diffusers training script, and its exact reversal.

A script is recognised by its fingerprint: every anchor line of its edits must occur exactly
once. The patch only inserts lines, each ending in ``MARK``; the first names the SHA-256 of the
original file, so ``unpatch`` removes the marked lines and checks that the result is the
original byte for byte (a patched file changed since is refused, as is a file with CRLF line
endings or an anchor missing or doubled). The inserted lines do nothing unless the script is
given ``--sdplug_preset`` (``sdplug diffusers`` passes it): each returns the script's own value.
A tree's scripts are written all or nothing, never through a link (``sdplug.hosts.patch_files``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from sdplug.errors import SdplugError
from sdplug.hosts.patch_files import Rewrite, check_targets, decode_target, read_target, replace_files, tree_folder

VERSION = "main-2026-08"  # the diffusers examples these edits fit (the audit's host version)

MARK = "  # sdplug"
_HEADER = re.compile(r"^# sdplug patch: original sha256 ([0-9a-f]{64})" + re.escape(MARK) + r"\n$")
SCRIPTS = (
    "train_text_to_image_lora.py",
    "train_dreambooth_lora.py",
    "train_text_to_image_lora_sdxl.py",
    "train_dreambooth_lora_sdxl.py",
)
FOLDERS = {"train_text_to_image_lora.py": "text_to_image", "train_text_to_image_lora_sdxl.py": "text_to_image"}


class DiffusersScriptError(SdplugError):
    """A script (or tree) the diffusers host does not know, or a patch that does not fit."""


@dataclasses.dataclass(frozen=True)
class Edit:
    anchor: str  # the start of exactly one line of the script (indentation included)
    text: str  # the lines inserted (no trailing newline; MARK is appended to each)
    before: bool = False  # insert before the anchor line instead of after it
    until: str | None = None  # insert after the first line equal to this, at or below the anchor


_OPTION = '{i}parser.add_argument("--sdplug_preset", type=str, default=None, help="sdplug preset (TOML): its tricks replace this script\'s own")'
_IMPORT = Edit("check_min_version(", "import sdplug.hosts.diffusers_scripts.session as _sdplug")
_BIND = Edit("    noise_scheduler = DDPMScheduler.from_pretrained(", "    _sdplug.bind(noise_scheduler, args)")
# the dreambooth scripts' loss, with the prior-preservation pair when they train one
_DREAMBOOTH_LOSS = Edit(
    "                accelerator.backward(loss)",
    "                loss = _sdplug.loss(model_pred, target, timesteps, loss, (model_pred_prior, target_prior, "
    "args.prior_loss_weight) if args.with_prior_preservation else None)",
    before=True,
)
_STEP = Edit("                global_step += 1", "                _sdplug.step()")
_FINISH = Edit("    accelerator.end_training()", "    _sdplug.finish(args.output_dir)", before=True)
_ATTENTION = Edit(
    '            raise ValueError("xformers is not available. Make sure it is installed correctly")',
    "    _sdplug.attention(unet)",
)
_TIMESTEPS = "                timesteps = timesteps.long()"
_TARGET = Edit(
    '                    raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")',
    "                target = _sdplug.target({x}, noise, timesteps, target)",
)


def _activate(script: str) -> Edit:
    return Edit("    return args", f"    _sdplug.activate(args, parser, {script!r})", before=True)


def _noise(x: str, noisy: str) -> list[Edit]:
    return [
        Edit(_TIMESTEPS, f"                noise, timesteps = _sdplug.noise_and_timesteps({x}, noise, timesteps)"),
        Edit(
            f"                {noisy} = noise_scheduler.add_noise(",
            f"                {noisy} = _sdplug.noisy_input({x}, noise, timesteps, {noisy})",
        ),
        dataclasses.replace(_TARGET, text=_TARGET.text.format(x=x)),
    ]


def _optimizer(name: str) -> Edit:
    return Edit(f"    optimizer = {name}(", "    optimizer = _sdplug.optimizer(optimizer, args)", until="    )")


EDITS: dict[str, list[Edit]] = {
    "train_text_to_image_lora.py": [
        _IMPORT,
        Edit("    args = parser.parse_args()", _OPTION.format(i="    "), before=True),
        _activate("train_text_to_image_lora.py"),
        _BIND,
        _ATTENTION,
        _optimizer("optimizer_cls"),
        *_noise("latents", "noisy_latents"),
        Edit(
            '                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]',
            '                _sdplug.drop_captions(batch, epoch, lambda: tokenize_captions({caption_column: [""]}))',
            before=True,
        ),
        Edit(
            "                # Gather the losses across all processes",
            "                loss = _sdplug.loss(model_pred, target, timesteps, loss)",
            before=True,
        ),
        _STEP,
        _FINISH,
    ],
    "train_dreambooth_lora.py": [
        _IMPORT,
        Edit("    if input_args is not None:", _OPTION.format(i="    "), before=True),
        _activate("train_dreambooth_lora.py"),
        _BIND,
        _ATTENTION,
        _optimizer("optimizer_class"),
        *_noise("model_input", "noisy_model_input"),
        Edit(
            "                # Get the text embedding for conditioning",
            "                _sdplug.drop_captions(batch, epoch, lambda: validation_prompt_negative_prompt_embeds if args.pre_compute_text_embeddings "
            'else tokenize_prompt(tokenizer, "", tokenizer_max_length=args.tokenizer_max_length))',
            before=True,
        ),
        _DREAMBOOTH_LOSS,
        _STEP,
        _FINISH,
    ],
    "train_text_to_image_lora_sdxl.py": [  # two tokenizers: a dropped row gets both tokenizations of ""
        _IMPORT,
        Edit("    if input_args is not None:", _OPTION.format(i="    "), before=True),
        _activate("train_text_to_image_lora_sdxl.py"),
        _BIND,
        _ATTENTION,
        _optimizer("optimizer_class"),
        *_noise("model_input", "noisy_model_input"),
        Edit(
            "                prompt_embeds, pooled_prompt_embeds = encode_prompt(",
            '                _sdplug.drop_captions(batch, epoch, lambda: {"input_ids_one": tokenize_prompt(tokenizer_one, ""), '
            '"input_ids_two": tokenize_prompt(tokenizer_two, "")}, key="input_ids_one")',
            before=True,
        ),
        Edit(
            "                # Gather the losses across all processes",
            "                loss = _sdplug.loss(model_pred, target, timesteps, loss)",
            before=True,
        ),
        _STEP,
        _FINISH,
    ],
    "train_dreambooth_lora_sdxl.py": [  # EDM-style training is refused at bind; two optimizer branches
        _IMPORT,
        Edit("    if input_args is not None:", _OPTION.format(i="    "), before=True),
        _activate("train_dreambooth_lora_sdxl.py"),
        Edit(
            "    text_encoder_one = text_encoder_cls_one.from_pretrained(", "    _sdplug.bind(noise_scheduler, args)", before=True
        ),
        _ATTENTION,
        Edit(
            "    # If custom instance prompts are NOT provided", "    optimizer = _sdplug.optimizer(optimizer, args)", before=True
        ),
        Edit(
            "    " + _TIMESTEPS,
            "                    noise, timesteps = _sdplug.noise_and_timesteps(model_input, noise, timesteps)",
        ),
        *_noise("model_input", "noisy_model_input")[1:],
        # the prompt embeddings the script shares across steps (one row, repeated): one row per
        # sample for this step, the dropped ones the script's own encoding of "", then restored (the
        # script deletes its lists of encoders and tokenizers once the instance prompt is encoded)
        Edit(
            "                # Predict the noise residual",
            "                _sdplug_shared = None if args.train_text_encoder else (prompt_embeds, unet_add_text_embeds)\n"
            "                if _sdplug_shared is not None:\n"
            "                    prompt_embeds, unet_add_text_embeds, elems_to_repeat_text_embeds = _sdplug.drop_embeddings(epoch, prompt_embeds, "
            'unet_add_text_embeds, elems_to_repeat_text_embeds, lambda: compute_text_embeddings("", [text_encoder_one, text_encoder_two], [tokenizer_one, tokenizer_two]))',
            before=True,
        ),
        Edit(
            "                weighting = None",
            "                if _sdplug_shared is not None:\n                    prompt_embeds, unet_add_text_embeds = _sdplug_shared",
            before=True,
        ),
        _DREAMBOOTH_LOSS,
        _STEP,
        _FINISH,
    ],
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _line_index(lines: list[str], edit: Edit, script: str) -> int:
    hits = [i for i, line in enumerate(lines) if line.startswith(edit.anchor)]
    if len(hits) != 1:
        raise DiffusersScriptError(
            f"{script}: the line starting {edit.anchor.strip()!r} occurs {len(hits)} times (expected once): a version of "
            "the script sdplug does not know, or a changed copy. Nothing was changed; supported: diffusers' examples "
            "at main (2026-08)."
        )
    index = hits[0]
    if edit.until is not None:
        ends = [i for i in range(index, len(lines)) if lines[i] == edit.until + "\n"]
        if not ends:
            raise DiffusersScriptError(f"{script}: no line {edit.until!r} after {edit.anchor.strip()!r}; nothing was changed.")
        return ends[0] + 1
    return index if edit.before else index + 1


def edits_for(script: str) -> list[Edit]:
    if script not in EDITS:
        raise DiffusersScriptError(f"{script}: the sdplug diffusers host supports {', '.join(sorted(EDITS))}.")
    return EDITS[script]


def _header(lines: list[str]) -> re.Match[str] | None:
    """The header line: first, or second after a ``#!`` line (which must stay first)."""
    for line in lines[:2]:
        match = _HEADER.match(line)
        if match:
            return match
    return None


def is_patched(text: str) -> bool:
    return _header(text.splitlines(keepends=True)) is not None


def fingerprint(text: str, script: str) -> str:
    """The version name of a known original script (raises naming the anchor that does not fit)."""
    if "\r\n" in text:
        raise DiffusersScriptError(f"{script}: CRLF line endings; the patch fits the script as diffusers ships it (LF).")
    lines = text.splitlines(keepends=True)
    for edit in edits_for(script):
        _line_index(lines, edit, script)
    return VERSION


def patch_source(text: str, script: str) -> str:
    """The patched script (``text`` must be a known original)."""
    if is_patched(text):
        raise DiffusersScriptError(f"{script}: already patched by sdplug.")
    fingerprint(text, script)
    lines = text.splitlines(keepends=True)
    inserts = sorted(((_line_index(lines, e, script), e) for e in edits_for(script)), key=lambda pair: pair[0])
    position = 1 if lines and lines[0].startswith("#!") else 0
    out = [*lines[:position], f"# sdplug patch: original sha256 {sha256(text.encode('utf-8'))}{MARK}\n"]
    for index, edit in inserts:
        out += lines[position:index]
        out += [line + MARK + "\n" for line in edit.text.split("\n")]
        position = index
    return "".join(out + lines[position:])


def unpatch_source(text: str, script: str) -> str:
    """The original script back from ``patch_source``'s output, checked byte for byte."""
    lines = text.splitlines(keepends=True)
    match = _header(lines)
    if match is None:
        raise DiffusersScriptError(f"{script}: not patched by sdplug (no header line).")
    original = "".join(line for line in lines if not line.endswith(MARK + "\n"))
    if sha256(original.encode("utf-8")) != match.group(1):
        raise DiffusersScriptError(
            f"{script}: changed since sdplug patched it; removing the patch would not give the original back. Nothing was changed."
        )
    return original


def find_scripts(directory: Path) -> list[tuple[str, Path]]:
    """The supported scripts in a diffusers checkout (``examples/...``), an ``examples`` folder,
    or a folder holding the scripts themselves."""
    directory = Path(directory)
    found = []
    for script in sorted(EDITS):
        folder = FOLDERS.get(script, "dreambooth")
        for candidate in (directory / script, directory / folder / script, directory / "examples" / folder / script):
            # a link (even dangling) or a folder by the script's name is found, so that patching
            # refuses it by name instead of skipping it
            if candidate.is_symlink() or candidate.exists():
                found.append((script, candidate))
                break
    if not found:
        raise DiffusersScriptError(
            f"{directory}: none of {', '.join(sorted(EDITS))} found (checked DIR, DIR/<folder>, DIR/examples/<folder>)."
        )
    return found


def _tree(directory: Path, command: str) -> tuple[Path, list[tuple[str, Path]]]:
    """The folder and its supported scripts, each one the tree's own regular file (else refused)."""
    root = tree_folder(
        directory,
        usage=f"sdplug {command} diffusers-examples DIR",
        what="a diffusers checkout, its examples folder or a folder holding the scripts",
        error=DiffusersScriptError,
    )
    scripts = find_scripts(root)
    check_targets(root, [path for _, path in scripts])
    return root, scripts


def apply(directory: Path) -> list[str]:
    """``sdplug patch diffusers-examples DIR``: every found script patched, all checked first,
    then written all or nothing."""
    root, scripts = _tree(directory, "patch")
    rewrites, results = [], []
    for script, path in scripts:
        data = read_target(path)
        text = decode_target(path, data)
        if is_patched(text):
            unpatch_source(text, script)  # refuse a patched file changed since
            results.append(f"already patched: {path}")
            continue
        rewrites.append(Rewrite(path, data, patch_source(text, script).encode("utf-8")))
    replace_files(root, rewrites)
    results += [f"patched: {rewrite.path} (accepts --sdplug_preset PATH)" for rewrite in rewrites]
    return results


def revert(directory: Path) -> list[str]:
    """``sdplug unpatch diffusers-examples DIR``: every patched script back to its original bytes,
    all or nothing."""
    root, scripts = _tree(directory, "unpatch")
    rewrites, results = [], []
    for script, path in scripts:
        data = read_target(path)
        text = decode_target(path, data)
        if not is_patched(text):
            results.append(f"not patched: {path}")
            continue
        rewrites.append(Rewrite(path, data, unpatch_source(text, script).encode("utf-8")))
    replace_files(root, rewrites)
    return results + [f"restored: {rewrite.path}" for rewrite in rewrites]
