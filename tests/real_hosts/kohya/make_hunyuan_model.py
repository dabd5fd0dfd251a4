"""Write random-weight HunyuanImage-2.1 files for sd-scripts' hunyuan_image_train_network.py, offline.

    python make_hunyuan_model.py OUTDIR --tree TREE [--seed 0]

sd-scripts builds every HunyuanImage model from a config fixed in its own code and loads it with
strict=True, so nothing here can be smaller than the published models. The tensor names and shapes
are therefore taken from TREE's own classes, built on the meta device (the DiT from
library/hunyuan_image_models.py, the VAE from library/hunyuan_image_vae.py, Qwen2.5-VL and byT5 from
the config JSON written inside library/hunyuan_image_text_encoder.py); the loader's strict load is
the check that they fit. Writes, in the layouts those loaders read:

    OUTDIR/hunyuan_image_2.1.safetensors  the DiT (20 double + 40 single MM blocks, hidden 3584), 17.43 B
                                  params (35.8 GB): the blocks' linear weights bf16, because
                                  `--fp8_scaled`, the only way it fits this machine's memory, quantises
                                  them as it loads and refuses weights already in fp8; the other 0.47 B
                                  (norms, embedders, refiner, final layer) fp32, because on a CPU a
                                  layer norm refuses fp32 activations with bf16 weights (see dit_specs).
    OUTDIR/qwen2.5-vl-7b.safetensors  Qwen2.5-VL-7B-Instruct with its vision tower and lm_head, keys as
                                  published ("model.*", "visual.*", "lm_head.*"), 8.29 B params,
                                  stored fp8 (8.3 GB): with --disable_mmap_load_safetensors kohya's
                                  load_qwen2_5_vl casts it to bf16 tensor by tensor.
    OUTDIR/byt5.safetensors       the byT5-small encoder ("shared.weight", "encoder.*"), its embedding
                                  grown by the colour and font tokens kohya's add_special_token adds, fp16.
    OUTDIR/vae.safetensors        HunyuanVAE2D (32x spatial, 64 latent channels), bf16.

Random weights as make_flux_model.py's (seeded per tensor name), one tensor at a time, so building
needs little memory whatever the file's size; idempotent (a file that exists is kept). Run it with the
tree's venv: it imports the tree's modules and transformers.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_flux_model  # noqa: E402
from make_flux_model import Spec, _meta_state_dict_specs, build  # noqa: E402

make_flux_model._ST_DTYPES.setdefault(torch.float8_e4m3fn, "F8_E4M3")


def _config_json(tree: Path, name: str) -> dict:
    """A config JSON written as a string constant inside a function of hunyuan_image_text_encoder.py."""
    source = (tree / "library" / "hunyuan_image_text_encoder.py").read_text()
    match = re.search(name + r'\s*=\s*"""(.*?)"""', source, re.S)
    if match is None:
        sys.exit(f"{name} not found in {tree}/library/hunyuan_image_text_encoder.py: this recipe knows main 48d368fa")
    return json.loads(match.group(1))


def dit_specs(tree: Path) -> list[Spec]:
    """bf16 where --fp8_scaled quantises (the blocks' linear weights); fp32 elsewhere, because on a CPU
    F.layer_norm refuses fp32 activations (kohya hands the cached byT5 rows over as fp32) with bf16
    weights, which CUDA accepts: the published file's bf16 norms stop the step in ByT5Mapper."""
    from library import hunyuan_image_models as models

    specs = _meta_state_dict_specs(lambda: models.HYImageDiffusionTransformer(attn_mode="torch"), torch.bfloat16)

    def quantised(name: str) -> bool:  # fp8_optimization_utils' is_target_key with the model's lists
        return (
            any(key in name for key in models.FP8_OPTIMIZATION_TARGET_KEYS)
            and name.endswith(".weight")
            and not any(key in name for key in models.FP8_OPTIMIZATION_EXCLUDE_KEYS)
        )

    return [s if quantised(s.name) else s._replace(dtype=torch.float32) for s in specs]


def vae_specs(tree: Path) -> list[Spec]:
    from library import hunyuan_image_vae

    return _meta_state_dict_specs(lambda: hunyuan_image_vae.HunyuanVAE2D(chunk_size=None), torch.bfloat16)


def qwen2_5_vl_specs(tree: Path) -> list[Spec]:
    """transformers' Qwen2_5_VLForConditionalGeneration with the tree's config, renamed back to the published keys."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(**_config_json(tree, "QWEN2_5_VL_CONFIG_JSON"))
    specs = _meta_state_dict_specs(lambda: Qwen2_5_VLForConditionalGeneration._from_config(config), torch.float8_e4m3fn)
    published = []
    for s in specs:  # the inverse of load_qwen2_5_vl's renaming
        name = s.name
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model.") :]
        elif name.startswith("model.visual."):
            name = "visual." + name[len("model.visual.") :]
        published.append(s._replace(name=name))
    return published


def byt5_specs(tree: Path) -> list[Spec]:
    """The byT5 encoder after kohya's add_special_token (its tokenizer needs no files: ByT5Tokenizer())."""
    from library import hunyuan_image_text_encoder
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    config = T5Config(**_config_json(tree, "BYT5_CONFIG_JSON"))

    def encoder() -> torch.nn.Module:
        model = T5ForConditionalGeneration._from_config(config).get_encoder()
        hunyuan_image_text_encoder.add_special_token(ByT5Tokenizer(), model)
        return model

    specs = _meta_state_dict_specs(encoder, torch.float16)
    return [s._replace(name="shared.weight" if s.name == "embed_tokens.weight" else "encoder." + s.name) for s in specs]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--tree", type=Path, required=True, help="the sd-scripts tree whose modules give the layouts")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(a.tree.resolve()))
    a.outdir.mkdir(parents=True, exist_ok=True)
    build(a.outdir / "byt5.safetensors", lambda: byt5_specs(a.tree), a.seed, "byT5-small encoder + glyph tokens, fp16")
    build(a.outdir / "vae.safetensors", lambda: vae_specs(a.tree), a.seed, "HunyuanVAE2D, bf16")
    build(a.outdir / "qwen2.5-vl-7b.safetensors", lambda: qwen2_5_vl_specs(a.tree), a.seed, "Qwen2.5-VL-7B, fp8")
    build(a.outdir / "hunyuan_image_2.1.safetensors", lambda: dit_specs(a.tree), a.seed, "HunyuanImage-2.1 DiT, bf16 + fp32")
    print(f"hunyuan model OK: {a.outdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
