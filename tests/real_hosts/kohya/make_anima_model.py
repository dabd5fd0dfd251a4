"""Write random-weight Anima-format files for sd-scripts' anima_train_network.py, offline.

    python make_anima_model.py OUTDIR [--dtype fp8|bf16] [--seed 0] [--check TREE]

Writes, in the layouts sd-scripts' library/anima_utils.py and qwen_image_autoencoder_kl.py read:

    OUTDIR/anima.safetensors      the Anima DiT (Cosmos-Predict2-2B MiniTrainDIT + the LLM adapter),
                                  keys "net."-prefixed as in the published file, at its FULL size:
                                  load_anima_model builds a fixed config (model_channels 2048,
                                  28 blocks, 16 heads, AdaLN-LoRA 256, cross-attention 1024, patch 2,
                                  16 + 1 (padding mask) input channels; LLM adapter 6 x 1024, T5
                                  vocab 32128) and raises on any missing or unexpected key (only
                                  the RoPE buffers seq / dim_spatial_range / dim_temporal_range may
                                  be absent; they are). ~2.09 B params.
    OUTDIR/qwen3-0.6b.safetensors Qwen3-0.6B (transformers Qwen3Model, keys "model."-prefixed) at its
                                  full size, the numbers of sd-scripts' bundled configs/qwen3_06b
                                  (28 x 1024, 16 heads, 8 kv heads, head_dim 128, vocab 151936; tied
                                  embeddings: no lm_head). A single file makes --qwen3 use that
                                  bundled config and tokenizer. ~0.60 B params.
    OUTDIR/qwen-image-vae.safetensors
                                  the Qwen-Image VAE (AutoencoderKLQwenImage, diffusers key names:
                                  base_dim 96, dim_mult 1 2 4 4, 2 res blocks, z 16, causal 3-D convs),
                                  full size (load_vae: fixed config, strict=True). ~0.13 B params.

--dtype (default fp8) is the DiT's storage dtype: float8_e4m3fn (~2.1 GB) or bf16 (~4.2 GB). The loader
(load_safetensors_with_lora_and_fp8, tensor by tensor) casts it to the run's dtype, so in memory it is
bf16 either way; fp8 keeps this recipe's models (with make_lumina_model.py's) under ~12 GB of disk.
Qwen3 and the VAE are bf16. Tokenizers: none to write --
anima_train_network.py reads the Qwen3 tokenizer from the tree's configs/qwen3_06b and the T5
tokenizer from its configs/t5_old when --qwen3 is a file and --t5_tokenizer_path is not given.
Random weights as make_flux_model.py's (seeded per tensor name), one tensor at a time, idempotent.

--check TREE: build sd-scripts' own Anima, Qwen3 (from the tree's config) and Qwen-Image VAE on the
meta device and compare every written tensor's name and shape with theirs (after the loaders'
prefix handling); exits non-zero on any difference.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_flux_model  # noqa: E402
from make_flux_model import Spec, _linear, _meta_state_dict_specs, build  # noqa: E402

make_flux_model._ST_DTYPES.setdefault(torch.float8_e4m3fn, "F8_E4M3")
DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}


def anima_dit_specs(dtype: torch.dtype, prefix: str = "net.") -> list[Spec]:
    """anima_models.Anima with anima_utils.load_anima_model's fixed config."""
    d, blocks, heads, ctx, lora, in_ch, patch = 2048, 28, 16, 1024, 256, 16, 2
    head = d // heads
    p = prefix
    s: list[Spec] = []
    s += _linear(f"{p}x_embedder.proj.1", d, (in_ch + 1) * patch * patch, dtype, bias=False)  # + the padding-mask channel
    s += _linear(f"{p}t_embedder.1.linear_1", d, d, dtype, bias=False)  # AdaLN-LoRA: no bias, 3 x d out
    s += _linear(f"{p}t_embedder.1.linear_2", 3 * d, d, dtype, bias=False)

    # the LLM adapter: T5 ids -> 1024 (source Qwen3 1024, model 1024, 6 blocks with self-attention, 16 heads)
    a, a_heads = 1024, 16
    q = f"{p}llm_adapter"
    s += [Spec(f"{q}.embed.weight", (32128, a), dtype, "embed")]
    for i in range(6):
        b = f"{q}.blocks.{i}"
        for att in ("self_attn", "cross_attn"):
            s += [Spec(f"{b}.norm_{att}.weight", (a,), dtype, "ones")]
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                s += _linear(f"{b}.{att}.{proj}", a, a, dtype, bias=False)
            s += [Spec(f"{b}.{att}.{n}.weight", (a // a_heads,), dtype, "ones") for n in ("q_norm", "k_norm")]
        s += [Spec(f"{b}.norm_mlp.weight", (a,), dtype, "ones")]
        s += _linear(f"{b}.mlp.0", 4 * a, a, dtype) + _linear(f"{b}.mlp.2", a, 4 * a, dtype)
    s += _linear(f"{q}.out_proj", a, a, dtype) + [Spec(f"{q}.norm.weight", (a,), dtype, "ones")]

    for i in range(blocks):
        b = f"{p}blocks.{i}"
        for att, kv_in in (("self_attn", d), ("cross_attn", ctx)):
            s += _linear(f"{b}.{att}.q_proj", d, d, dtype, bias=False)
            s += _linear(f"{b}.{att}.k_proj", d, kv_in, dtype, bias=False)
            s += _linear(f"{b}.{att}.v_proj", d, kv_in, dtype, bias=False)
            s += _linear(f"{b}.{att}.output_proj", d, d, dtype, bias=False)
            s += [Spec(f"{b}.{att}.{n}.weight", (head,), dtype, "ones") for n in ("q_norm", "k_norm")]
        s += _linear(f"{b}.mlp.layer1", 4 * d, d, dtype, bias=False) + _linear(f"{b}.mlp.layer2", d, 4 * d, dtype, bias=False)
        for mod in ("self_attn", "cross_attn", "mlp"):
            s += _linear(f"{b}.adaln_modulation_{mod}.1", lora, d, dtype, bias=False)
            s += _linear(f"{b}.adaln_modulation_{mod}.2", 3 * d, lora, dtype, bias=False)
    s += _linear(f"{p}final_layer.linear", patch * patch * in_ch, d, dtype, bias=False)
    s += _linear(f"{p}final_layer.adaln_modulation.1", lora, d, dtype, bias=False)
    s += _linear(f"{p}final_layer.adaln_modulation.2", 2 * d, lora, dtype, bias=False)
    s += [Spec(f"{p}t_embedding_norm.weight", (d,), dtype, "ones")]
    return s


QWEN3_06B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
)  # fmt: skip


def qwen3_specs(dtype: torch.dtype = torch.bfloat16) -> list[Spec]:
    """Qwen3-0.6B's decoder (transformers Qwen3Model), keys prefixed "model." (load_qwen3_text_encoder strips it)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**QWEN3_06B)
    return [
        Spec("model." + sp.name, sp.shape, sp.dtype, sp.init) for sp in _meta_state_dict_specs(lambda: Qwen3Model(config), dtype)
    ]


def qwen_image_vae_specs(dtype: torch.dtype = torch.bfloat16) -> list[Spec]:
    """AutoencoderKLQwenImage (qwen_image_autoencoder_kl.load_vae's config), diffusers key names."""
    base, mult, n_res, z = 96, (1, 2, 4, 4), 2, 16
    t_down = (False, True, True)
    s: list[Spec] = []

    def conv(name: str, out_c: int, in_c: int, k: tuple[int, ...]) -> None:
        s.extend([Spec(f"{name}.weight", (out_c, in_c, *k), dtype, "linear"), Spec(f"{name}.bias", (out_c,), dtype, "zeros")])

    def rms(name: str, c: int, images: bool = False) -> None:  # QwenImageRMS_norm.gamma, no bias
        s.append(Spec(f"{name}.gamma", (c, 1, 1) if images else (c, 1, 1, 1), dtype, "ones"))

    def res(name: str, i: int, o: int) -> None:
        rms(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, (3, 3, 3))
        rms(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, (3, 3, 3))
        if i != o:
            conv(f"{name}.conv_shortcut", o, i, (1, 1, 1))

    def mid(name: str, c: int) -> None:
        res(f"{name}.resnets.0", c, c)
        rms(f"{name}.attentions.0.norm", c, images=True)
        conv(f"{name}.attentions.0.to_qkv", 3 * c, c, (1, 1))
        conv(f"{name}.attentions.0.proj", c, c, (1, 1))
        res(f"{name}.resnets.1", c, c)

    # encoder: outputs 2 z (mean, logvar); down_blocks is one flat list of res blocks and resamplers
    dims = [base * m for m in (1, *mult)]
    conv("encoder.conv_in", dims[0], 3, (3, 3, 3))
    idx = 0
    for i, (i_dim, o_dim) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
        for _ in range(n_res):
            res(f"encoder.down_blocks.{idx}", i_dim, o_dim)
            i_dim, idx = o_dim, idx + 1
        if i != len(mult) - 1:
            conv(f"encoder.down_blocks.{idx}.resample.1", o_dim, o_dim, (3, 3))
            if t_down[i]:  # downsample3d
                conv(f"encoder.down_blocks.{idx}.time_conv", o_dim, o_dim, (3, 1, 1))
            idx += 1
    mid("encoder.mid_block", dims[-1])
    rms("encoder.norm_out", dims[-1])
    conv("encoder.conv_out", 2 * z, dims[-1], (3, 3, 3))
    conv("quant_conv", 2 * z, 2 * z, (1, 1, 1))
    conv("post_quant_conv", z, z, (1, 1, 1))

    # decoder
    t_up = t_down[::-1]
    dims = [base * m for m in (mult[-1], *mult[::-1])]
    conv("decoder.conv_in", dims[0], z, (3, 3, 3))
    mid("decoder.mid_block", dims[0])
    for i, (i_dim, o_dim) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
        if i > 0:
            i_dim //= 2  # the previous block's upsampler halves the channels
        for j in range(n_res + 1):
            res(f"decoder.up_blocks.{i}.resnets.{j}", i_dim, o_dim)
            i_dim = o_dim
        if i != len(mult) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.resample.1", o_dim // 2, o_dim, (3, 3))
            if t_up[i]:  # upsample3d
                conv(f"decoder.up_blocks.{i}.upsamplers.0.time_conv", 2 * o_dim, o_dim, (3, 1, 1))
    rms("decoder.norm_out", dims[-1])
    conv("decoder.conv_out", 3, dims[-1], (3, 3, 3))
    return s


def check(outdir: Path, tree: Path) -> None:
    """Compare the written files' names/shapes with sd-scripts' own modules built on the meta device."""
    import json

    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(tree))
    from library import anima_models, qwen_image_autoencoder_kl  # the tree's own classes

    def shapes(path: Path, strip: str = "") -> dict[str, tuple]:
        with safe_open(str(path), framework="pt") as f:
            return {k.removeprefix(strip): tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def compare(what: str, ours: dict, theirs: dict, may_lack: tuple[str, ...] = ()) -> int:
        missing = sorted(k for k in set(theirs) - set(ours) if not any(b in k for b in may_lack))
        extra = sorted(set(ours) - set(theirs))
        wrong = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
        for label, keys in (("missing", missing), ("unexpected", extra), ("shape differs", wrong)):
            if keys:
                print(f"check {what}: {label}: {len(keys)}, e.g. {keys[:3]}")
        if not (missing or extra or wrong):
            print(f"check OK: {what}: {len(ours)} tensors match sd-scripts' module")
        return len(missing) + len(extra) + len(wrong)

    anima_config = dict(
        max_img_h=512,
        max_img_w=512,
        max_frames=128,
        in_channels=16,
        out_channels=16,
        patch_spatial=2,
        patch_temporal=1,
        model_channels=2048,
        concat_padding_mask=True,
        crossattn_emb_channels=1024,
        pos_emb_cls="rope3d",
        pos_emb_learnable=True,
        pos_emb_interpolation="crop",
        min_fps=1,
        max_fps=30,
        use_adaln_lora=True,
        adaln_lora_dim=256,
        num_blocks=28,
        num_heads=16,
        extra_per_block_abs_pos_emb=False,
        rope_h_extrapolation_ratio=4.0,
        rope_w_extrapolation_ratio=4.0,
        rope_t_extrapolation_ratio=1.0,
        rope_enable_fps_modulation=False,
        use_llm_adapter=True,
    )  # fmt: skip  (anima_utils.load_anima_model's, which is not importable without building the model)
    with init_empty_weights():
        dit = anima_models.Anima(**anima_config)
    theirs = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    bad = compare("anima.safetensors", shapes(outdir / "anima.safetensors", "net."), theirs,
                  may_lack=("seq", "dim_spatial_range", "dim_temporal_range", "inv_freq"))  # fmt: skip
    config = Qwen3Config(**json.loads((tree / "configs" / "qwen3_06b" / "config.json").read_text()))
    with torch.device("meta"):
        qwen3 = Qwen3ForCausalLM(config).model
    theirs = {k: tuple(v.shape) for k, v in qwen3.state_dict().items()}
    bad += compare("qwen3-0.6b.safetensors", shapes(outdir / "qwen3-0.6b.safetensors", "model."), theirs)
    with torch.device("meta"):
        vae = qwen_image_autoencoder_kl.AutoencoderKLQwenImage()  # load_vae's config: the class defaults
    theirs = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    bad += compare("qwen-image-vae.safetensors", shapes(outdir / "qwen-image-vae.safetensors"), theirs)
    if bad:
        sys.exit(f"check FAILED: {bad} differences against {tree}")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp8", help="storage dtype of the DiT (default fp8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", type=Path, default=None, metavar="TREE", help="compare with sd-scripts TREE's modules")
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    build(
        a.outdir / "anima.safetensors",
        lambda: anima_dit_specs(DTYPES[a.dtype]),
        a.seed,
        f"Anima DiT (Cosmos-Predict2 2B + LLM adapter), {a.dtype}",
    )
    build(a.outdir / "qwen3-0.6b.safetensors", qwen3_specs, a.seed, "Qwen3-0.6B, bf16")
    build(a.outdir / "qwen-image-vae.safetensors", qwen_image_vae_specs, a.seed, "Qwen-Image VAE, bf16")
    if a.check is not None:
        check(a.outdir, a.check)
    print(f"anima model OK: {a.outdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
