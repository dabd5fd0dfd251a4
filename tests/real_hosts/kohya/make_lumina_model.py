"""Write random-weight Lumina-Image-2.0-format files for sd-scripts' lumina_train_network.py, offline.

    python make_lumina_model.py OUTDIR [--ae PATH_TO_EXISTING_AE] [--dit-dtype fp8|bf16] [--gemma-dtype bf16|fp8]
                                      [--seed 0] [--check TREE]

Writes, in the layout sd-scripts' library/lumina_util.py reads:

    OUTDIR/lumina2.safetensors    NextDiT in Alpha-VLLM key names ("x_embedder.weight",
                                  "layers.N.attention.qkv.weight", ...) at its FULL size: sd-scripts
                                  builds NextDiT_2B_GQA_patch2_Adaln_Refiner from a fixed config
                                  (dim 2304, 26 layers + 2 noise + 2 context refiner layers, 24 heads,
                                  8 kv heads, qk-norm, cap_feat_dim 2304, 16 latent channels) on the meta
                                  device and loads with strict=False, assign=True: a missing tensor
                                  stays meta and the first .to() fails. ~2.61 B params.
    OUTDIR/gemma2-2b.safetensors  Gemma-2-2B (transformers Gemma2Model, keys "model."-prefixed as in
                                  the usual gemma_2_2b file) at FULL size: load_gemma2 builds it
                                  from a fixed config (26 x 2304, vocab 256000) under
                                  init_empty_weights, strict=False -- the same meta trap. ~2.61 B params.
    OUTDIR/ae.safetensors         the FLUX autoencoder (load_ae builds flux_models.AutoEncoder): with
                                  --ae PATH a symbolic link to PATH (e.g. make_flux_model.py's),
                                  else written (fp32, ~0.33 GB).

--dit-dtype (default fp8) / --gemma-dtype (default bf16): the storage dtype of the two 2.6 B files
(float8_e4m3fn ~2.6 GB, bf16 ~5.2 GB). sd-scripts casts both to the run's weight dtype on load
(load_lumina_model and load_gemma2 pass --mixed_precision's dtype to load_safetensors), so in memory
they are bf16 either way. The defaults are the disk budget against the memory budget: the DiT is read
first and, with --disable_mmap_load_safetensors, tensor by tensor, so its fp8 -> bf16 cast costs no
extra memory; Gemma2 is always read with safetensors' load_file (mmap) and then cast, so an fp8 Gemma2
keeps its whole fp8 copy mapped while the bf16 one is built (+2.4 GiB: a measured 12.6 GiB peak RSS
with the DiT resident, against 10.5-10.8 GiB with a bf16 file, which is used as it is). Random weights as make_flux_model.py's (seeded per tensor name;
Gemma2's RMSNorm scales are stored as 0, its "1 + weight" form). Written one tensor at a time
(make_flux_model.py's streaming writer), idempotent (existing files kept).

--check TREE: build sd-scripts' own NextDiT (lumina_models) and Gemma2 (lumina_util's config) on
the meta device from the sd-scripts tree TREE and compare every written tensor's name and shape
with theirs (after the loaders' own prefix handling); exits non-zero on any difference.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_flux_model  # noqa: E402
from make_flux_model import Spec, _linear, _meta_state_dict_specs, ae_specs, build  # noqa: E402

make_flux_model._ST_DTYPES.setdefault(torch.float8_e4m3fn, "F8_E4M3")  # the streaming writer's dtype table
DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}


def nextdit_2b_specs(dtype: torch.dtype) -> list[Spec]:
    """Lumina-Image-2.0's NextDiT (lumina_models.NextDiT_2B_GQA_patch2_Adaln_Refiner), Alpha-VLLM names."""
    dim, n_layers, n_refiner, heads, kv_heads, cap_dim, in_ch, patch = 2304, 26, 2, 24, 8, 2304, 16, 2
    head_dim = dim // heads  # 96 = sum(axes_dims 32, 32, 32)
    ffn = 256 * ((4 * dim + 255) // 256)  # FeedForward: hidden 4 * dim rounded up to multiple_of 256
    adaln_in = min(dim, 1024)
    s: list[Spec] = []
    s += _linear("t_embedder.mlp.0", adaln_in, 256, dtype) + _linear("t_embedder.mlp.2", adaln_in, adaln_in, dtype)
    s += [Spec("cap_embedder.0.weight", (cap_dim,), dtype, "ones")] + _linear("cap_embedder.1", dim, cap_dim, dtype)
    s += _linear("x_embedder", dim, patch * patch * in_ch, dtype)

    def block(p: str, modulation: bool) -> None:
        s.extend(_linear(f"{p}.attention.qkv", (heads + 2 * kv_heads) * head_dim, dim, dtype, bias=False))
        s.extend(_linear(f"{p}.attention.out", dim, heads * head_dim, dtype, bias=False))
        s.extend(Spec(f"{p}.attention.{n}.weight", (head_dim,), dtype, "ones") for n in ("q_norm", "k_norm"))
        s.extend(_linear(f"{p}.feed_forward.w1", ffn, dim, dtype, bias=False))
        s.extend(_linear(f"{p}.feed_forward.w2", dim, ffn, dtype, bias=False))
        s.extend(_linear(f"{p}.feed_forward.w3", ffn, dim, dtype, bias=False))
        for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            s.append(Spec(f"{p}.{n}.weight", (dim,), dtype, "ones"))
        if modulation:
            s.extend(_linear(f"{p}.adaLN_modulation.1", 4 * dim, adaln_in, dtype))

    for i in range(n_refiner):
        block(f"context_refiner.{i}", modulation=False)
    for i in range(n_refiner):
        block(f"noise_refiner.{i}", modulation=True)
    for i in range(n_layers):
        block(f"layers.{i}", modulation=True)
    s += [Spec("norm_final.weight", (dim,), dtype, "ones")]
    s += _linear("final_layer.linear", patch * patch * in_ch, dim, dtype)
    s += _linear("final_layer.adaLN_modulation.1", dim, adaln_in, dtype)
    return s


GEMMA2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
    query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip


def gemma2_specs(dtype: torch.dtype) -> list[Spec]:
    """google/gemma-2-2b's decoder (transformers Gemma2Model), keys prefixed "model." (load_gemma2 strips it)."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(**GEMMA2_2B)
    specs = _meta_state_dict_specs(lambda: Gemma2Model(config), dtype)
    out = []
    for sp in specs:
        init = "zeros" if len(sp.shape) == 1 else sp.init  # Gemma's RMSNorm scales by (1 + weight)
        out.append(Spec("model." + sp.name, sp.shape, sp.dtype, init))
    return out


def check(outdir: Path, tree: Path) -> None:
    """Compare the written files' names/shapes with sd-scripts' own modules built on the meta device."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import Gemma2Config, Gemma2Model

    sys.path.insert(0, str(tree))
    import library.lumina_models as lumina_models  # the tree's own classes

    def shapes(path: Path, strip: str = "") -> dict[str, tuple]:
        with safe_open(str(path), framework="pt") as f:
            return {k.removeprefix(strip): tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def compare(what: str, ours: dict, theirs: dict) -> int:
        missing = sorted(set(theirs) - set(ours))
        extra = sorted(set(ours) - set(theirs))
        wrong = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
        for label, keys in (("missing", missing), ("unexpected", extra), ("shape differs", wrong)):
            if keys:
                print(f"check {what}: {label}: {len(keys)}, e.g. {keys[:3]}")
        if not (missing or extra or wrong):
            print(f"check OK: {what}: {len(ours)} tensors match sd-scripts' module")
        return len(missing) + len(extra) + len(wrong)

    with torch.device("meta"):
        dit = lumina_models.NextDiT_2B_GQA_patch2_Adaln_Refiner()
    bad = compare(
        "lumina2.safetensors", shapes(outdir / "lumina2.safetensors"), {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    )
    lumina_util_config = Gemma2Config(**GEMMA2_2B)
    with init_empty_weights():
        gemma = Gemma2Model._from_config(lumina_util_config)
    theirs = {k: tuple(v.shape) for k, v in gemma.state_dict().items()}
    bad += compare("gemma2-2b.safetensors", shapes(outdir / "gemma2-2b.safetensors", "model."), theirs)
    if bad:
        sys.exit(f"check FAILED: {bad} differences against {tree}")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--ae", type=Path, default=None, help="an existing FLUX ae.safetensors to link instead of writing one")
    ap.add_argument("--dit-dtype", choices=sorted(DTYPES), default="fp8", help="storage dtype of the DiT (default fp8)")
    ap.add_argument("--gemma-dtype", choices=sorted(DTYPES), default="bf16", help="storage dtype of Gemma2 (default bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", type=Path, default=None, metavar="TREE", help="compare with sd-scripts TREE's modules")
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    dit_dtype, gemma_dtype = DTYPES[a.dit_dtype], DTYPES[a.gemma_dtype]
    build(a.outdir / "lumina2.safetensors", lambda: nextdit_2b_specs(dit_dtype), a.seed, f"Lumina 2 NextDiT 2B, {a.dit_dtype}")
    build(a.outdir / "gemma2-2b.safetensors", lambda: gemma2_specs(gemma_dtype), a.seed, f"Gemma-2-2B, {a.gemma_dtype}")
    ae = a.outdir / "ae.safetensors"
    if a.ae is not None and not ae.exists():
        src = a.ae.resolve()
        if not src.is_file():
            sys.exit(f"--ae {a.ae}: no such file")
        os.symlink(src, ae)
        print(f"linked: {ae} -> {src}")
    else:
        build(ae, ae_specs, a.seed, "FLUX AE, fp32")
    if a.check is not None:
        check(a.outdir, a.check)
    print(f"lumina model OK: {a.outdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
