"""Write random-weight SD3-format files for sd-scripts' sd3_train_network.py, offline.

    python make_sd3_model.py OUTDIR [--t5 PATH_TO_EXISTING_T5] [--depth 2] [--seed 0]

Writes, in the layout sd-scripts' library/sd3_utils.py reads:

    OUTDIR/sd3-tiny.safetensors   one checkpoint like sd3_medium.safetensors without text encoders:
                                  "model.diffusion_model.*" an MMDiT of --depth joint blocks (SD3's
                                  width is tied to depth: hidden 64 x depth, depth heads; SD3-medium
                                  style: no qk-norm, no x-block self-attention, pos_embed 192 x 192
                                  patches, adm 2048 = CLIP-L 768 + CLIP-G 1280, context 4096; bf16)
                                  and "first_stage_model.*" the 16-channel VAE (full size, fp32;
                                  the same tensors as FLUX's ae.safetensors, under that prefix).
                                  sd3_utils.analyze_state_dict_state reads depth, patch size,
                                  pos_embed size, adm / context widths from these shapes.
    OUTDIR/clip_l.safetensors     CLIP-L with text_projection (fp16), run with --clip_l
    OUTDIR/clip_g.safetensors     CLIP-G (bigG/14 text: 32 x 1280, text_projection 1280; fp16), --clip_g
    OUTDIR/t5xxl.safetensors      T5-XXL encoder, full size (bf16, ~9.5 GB), --t5xxl; with --t5 PATH a
                                  symbolic link to PATH instead (e.g. make_flux_model.py's: sd3_utils
                                  reads T5 with flux_utils.load_t5xxl, the same key names).

Uses make_flux_model.py (next to this file) for the streaming writer and the VAE / CLIP / T5 key
tables: one tensor in memory at a time, seeded per tensor name, idempotent (existing files kept).
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_flux_model import Spec, _linear, ae_specs, build, clip_specs, t5xxl_specs  # noqa: E402


def mmdit_specs(depth: int = 2, dtype: torch.dtype = torch.bfloat16, prefix: str = "model.diffusion_model.") -> list[Spec]:
    """SD3-medium-style MMDiT (sd3_models.MMDiT's key names) with DEPTH joint blocks; the last
    block's context_block is pre_only (attn.qkv and a 2 x hidden adaLN only)."""
    h, patch, in_ch, adm, ctx, pos_max = 64 * depth, 2, 16, 2048, 4096, 192
    p = prefix
    s: list[Spec] = [Spec(f"{p}pos_embed", (1, pos_max * pos_max, h), dtype, "embed")]
    s += [
        Spec(f"{p}x_embedder.proj.weight", (h, in_ch, patch, patch), dtype, "linear"),
        Spec(f"{p}x_embedder.proj.bias", (h,), dtype, "zeros"),
    ]
    s += _linear(f"{p}t_embedder.mlp.0", h, 256, dtype) + _linear(f"{p}t_embedder.mlp.2", h, h, dtype)
    s += _linear(f"{p}y_embedder.mlp.0", h, adm, dtype) + _linear(f"{p}y_embedder.mlp.2", h, h, dtype)
    s += _linear(f"{p}context_embedder", h, ctx, dtype)
    for b in range(depth):
        for side in ("context_block", "x_block"):
            q = f"{p}joint_blocks.{b}.{side}"
            pre_only = side == "context_block" and b == depth - 1
            s += _linear(f"{q}.attn.qkv", 3 * h, h, dtype)
            if not pre_only:
                s += _linear(f"{q}.attn.proj", h, h, dtype)
                s += _linear(f"{q}.mlp.fc1", 4 * h, h, dtype) + _linear(f"{q}.mlp.fc2", h, 4 * h, dtype)
            s += _linear(f"{q}.adaLN_modulation.1", (2 if pre_only else 6) * h, h, dtype)
    s += _linear(f"{p}final_layer.linear", patch * patch * in_ch, h, dtype)
    s += _linear(f"{p}final_layer.adaLN_modulation.1", 2 * h, h, dtype)
    return s


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--t5", type=Path, default=None, help="an existing T5-XXL safetensors to link instead of writing one")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    build(a.outdir / "sd3-tiny.safetensors", lambda: mmdit_specs(a.depth) + ae_specs(torch.float32, "first_stage_model."), a.seed,
          f"SD3 MMDiT depth {a.depth} (bf16) + VAE (fp32)")  # fmt: skip
    build(a.outdir / "clip_l.safetensors", lambda: clip_specs("l"), a.seed, "CLIP-L, fp16")
    build(a.outdir / "clip_g.safetensors", lambda: clip_specs("g"), a.seed, "CLIP-G, fp16")
    t5 = a.outdir / "t5xxl.safetensors"
    if a.t5 is not None and not t5.exists():
        src = a.t5.resolve()
        if not src.is_file():
            sys.exit(f"--t5 {a.t5}: no such file")
        os.symlink(src, t5)
        print(f"linked: {t5} -> {src}")
    else:
        build(t5, t5xxl_specs, a.seed, "T5-XXL encoder, bf16")
    print(f"sd3 model OK: {a.outdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
