"""Write random-weight FLUX.1-dev-format files for sd-scripts' flux_train_network.py, offline.

    python make_flux_model.py OUTDIR [--double-blocks 1] [--single-blocks 1] [--seed 0]

Writes, each a single safetensors file in the layout sd-scripts' library/flux_utils.py reads:

    OUTDIR/flux1-dev-tiny.safetensors   the DiT, BFL key names ("double_blocks.0.img_attn.qkv.weight",
                                        ...), FLUX.1's width (hidden 3072, 24 heads, in_channels 64,
                                        context 4096, vec 768, guidance_in as FLUX.1-dev) and only 1
                                        double + 1 single block (~0.55 B params, bf16, ~1.1 GB):
                                        sd-scripts counts the blocks from the keys, and takes dev vs
                                        schnell from the presence of guidance_in.*.
    OUTDIR/ae.safetensors               the AutoEncoder, BFL / LDM key names, full size (fp32, ~0.33 GB)
    OUTDIR/clip_l.safetensors           CLIP-L text model, transformers key names ("text_model.*" +
                                        "text_projection.weight", which FLUX ignores and SD3 uses), full
                                        size (fp16, ~0.25 GB)
    OUTDIR/t5xxl.safetensors            T5-XXL encoder, transformers key names ("shared.weight",
                                        "encoder.block.N.layer.*"), FULL size (~4.76 B params, bf16,
                                        ~9.5 GB): sd-scripts builds it on the meta device from a fixed
                                        config and loads with strict=False, so any missing tensor stays
                                        meta and fails later ("Cannot copy out of meta tensor").

Every file is written one tensor at a time (header first, then each tensor generated, written and
dropped), so building needs well under 1 GiB of memory whatever the file's size. Weights are random
(seeded per tensor name from --seed): matrices N(0, 1/fan_in), biases 0, norm scales 1, embeddings
small, so every forward pass stays finite in bf16. Idempotent: a file that exists is kept (files are
written as NAME.partial and renamed when complete). Needs only torch, safetensors and transformers
(transformers' own config classes give the CLIP / T5 key names and shapes, on the meta device).
make_sd3_model.py imports this file for its writer and its AE / CLIP / T5 tables.
"""

import argparse
import json
import struct
import sys
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


class Spec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: str  # "linear" | "ones" | "zeros" | "embed" | "embed1" (std 1) | "arange"


# ---------------------------------------------------------------- writer


def _init_tensor(spec: Spec, seed: int) -> torch.Tensor:
    shape = spec.shape
    if spec.init == "ones":
        return torch.ones(shape, dtype=spec.dtype)
    if spec.init == "zeros":
        return torch.zeros(shape, dtype=spec.dtype)
    if spec.init == "arange":
        return torch.arange(shape[-1], dtype=spec.dtype).expand(shape).contiguous()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    if spec.init == "linear":
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        std = fan_in**-0.5
    elif spec.init == "embed1":
        std = 1.0
    else:  # "embed"
        std = 0.02
    out = torch.empty(shape, dtype=spec.dtype)
    # generate in fp32 row chunks of <= 16 M elements: the peak stays small for the largest tensors
    rows = shape[0]
    per_row = out.numel() // max(rows, 1)
    step = max(1, (16 << 20) // max(per_row, 1))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        out[r : r + n] = torch.randn((n, *shape[1:]), generator=gen) * std
    return out


def write_safetensors(path: Path, specs: Iterable[Spec], seed: int, metadata: dict[str, str] | None = None) -> None:
    """Stream SPECS into PATH as a safetensors file, one tensor in memory at a time."""
    specs = list(specs)
    names = [s.name for s in specs]
    assert len(set(names)) == len(names), "duplicate tensor names"
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        nbytes = torch.empty((), dtype=s.dtype).element_size()
        for d in s.shape:
            nbytes *= d
        header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            t = _init_tensor(s, seed).contiguous()
            if t.numel():
                f.write(t.view(torch.uint8).numpy())  # the buffer itself, no bytes copy
            del t
    expected = 8 + len(raw) + offset
    assert tmp.stat().st_size == expected, (tmp, tmp.stat().st_size, expected)
    with open(tmp, "rb") as f:  # the header as written, read back
        (n,) = struct.unpack("<Q", f.read(8))
        written = json.loads(f.read(n))
    assert sorted(k for k in written if k != "__metadata__") == sorted(names)
    if expected < 16 << 30:  # and by the real reader, which maps the whole file (refused for a 35 GB one)
        from safetensors import safe_open

        with safe_open(str(tmp), framework="pt") as f:
            assert sorted(f.keys()) == sorted(names)
            probe = specs[-1]
            assert tuple(f.get_slice(probe.name).get_shape()) == probe.shape
    tmp.rename(path)


def build(path: Path, make_specs: Callable[[], list[Spec]], seed: int, what: str) -> None:
    if path.exists():
        print(f"exists: {path}")
        return
    specs = make_specs()
    n = sum(torch.Size(s.shape).numel() for s in specs)
    print(f"writing {path.name}: {what}, {len(specs)} tensors, {n / 1e9:.3f} B params ...", flush=True)
    write_safetensors(path, specs, seed)
    print(f"model OK: {path} ({path.stat().st_size / 2**30:.2f} GiB)", flush=True)


# ---------------------------------------------------------------- key tables


def _linear(prefix: str, out_f: int, in_f: int, dtype: torch.dtype, bias: bool = True) -> list[Spec]:
    specs = [Spec(f"{prefix}.weight", (out_f, in_f), dtype, "linear")]
    if bias:
        specs.append(Spec(f"{prefix}.bias", (out_f,), dtype, "zeros"))
    return specs


def flux_dit_specs(double_blocks: int = 1, single_blocks: int = 1, dtype: torch.dtype = torch.bfloat16) -> list[Spec]:
    """FLUX.1-dev's DiT in BFL naming (black-forest-labs/flux model.py), with fewer blocks."""
    h, mlp, heads, in_ch, ctx, vec = 3072, 3072 * 4, 24, 64, 4096, 768
    head_dim = h // heads
    s: list[Spec] = []
    s += _linear("img_in", h, in_ch, dtype)
    for emb, fin in (("time_in", 256), ("vector_in", vec), ("guidance_in", 256)):  # guidance_in: dev, not schnell
        s += _linear(f"{emb}.in_layer", h, fin, dtype) + _linear(f"{emb}.out_layer", h, h, dtype)
    s += _linear("txt_in", h, ctx, dtype)
    for b in range(double_blocks):
        for side in ("img", "txt"):
            p = f"double_blocks.{b}.{side}"
            s += _linear(f"{p}_mod.lin", 6 * h, h, dtype)
            s += _linear(f"{p}_attn.qkv", 3 * h, h, dtype)
            s += [Spec(f"{p}_attn.norm.query_norm.scale", (head_dim,), dtype, "ones")]
            s += [Spec(f"{p}_attn.norm.key_norm.scale", (head_dim,), dtype, "ones")]
            s += _linear(f"{p}_attn.proj", h, h, dtype)
            s += _linear(f"{p}_mlp.0", mlp, h, dtype) + _linear(f"{p}_mlp.2", h, mlp, dtype)
    for b in range(single_blocks):
        p = f"single_blocks.{b}"
        s += _linear(f"{p}.linear1", 3 * h + mlp, h, dtype)
        s += _linear(f"{p}.linear2", h, h + mlp, dtype)
        s += [Spec(f"{p}.norm.query_norm.scale", (head_dim,), dtype, "ones")]
        s += [Spec(f"{p}.norm.key_norm.scale", (head_dim,), dtype, "ones")]
        s += _linear(f"{p}.modulation.lin", 3 * h, h, dtype)
    s += _linear("final_layer.linear", in_ch, h, dtype)  # patch 2x2 x 16 latent channels = 64
    s += _linear("final_layer.adaLN_modulation.1", 2 * h, h, dtype)
    return s


def ae_specs(dtype: torch.dtype = torch.float32, prefix: str = "") -> list[Spec]:
    """The 16-channel LDM-style autoencoder of FLUX.1 (ae.safetensors) and of SD3 (first_stage_model.*):
    ch 128, ch_mult 1 2 4 4, 2 res blocks (3 in the decoder), z 16, no quant convs."""
    ch, ch_mult, n_res, z = 128, (1, 2, 4, 4), 2, 16
    s: list[Spec] = []

    def conv(name: str, out_c: int, in_c: int, k: int) -> None:
        s.extend(
            [
                Spec(f"{prefix}{name}.weight", (out_c, in_c, k, k), dtype, "linear"),
                Spec(f"{prefix}{name}.bias", (out_c,), dtype, "zeros"),
            ]
        )

    def norm(name: str, c: int) -> None:
        s.extend([Spec(f"{prefix}{name}.weight", (c,), dtype, "ones"), Spec(f"{prefix}{name}.bias", (c,), dtype, "zeros")])

    def res(name: str, in_c: int, out_c: int) -> None:
        norm(f"{name}.norm1", in_c)
        conv(f"{name}.conv1", out_c, in_c, 3)
        norm(f"{name}.norm2", out_c)
        conv(f"{name}.conv2", out_c, out_c, 3)
        if in_c != out_c:
            conv(f"{name}.nin_shortcut", out_c, in_c, 1)

    def mid(name: str, c: int) -> None:
        res(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for x in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{x}", c, c, 1)
        res(f"{name}.block_2", c, c)

    conv("encoder.conv_in", ch, 3, 3)
    in_mult = (1,) + ch_mult
    for i, m in enumerate(ch_mult):
        c_in, c_out = ch * in_mult[i], ch * m
        for j in range(n_res):
            res(f"encoder.down.{i}.block.{j}", c_in, c_out)
            c_in = c_out
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c_in, c_in, 3)
    top = ch * ch_mult[-1]
    mid("encoder.mid", top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", 2 * z, top, 3)

    conv("decoder.conv_in", top, z, 3)
    mid("decoder.mid", top)
    c_in = top
    ups: list[list[Spec]] = []
    for i in reversed(range(len(ch_mult))):  # decoder.up.{i} is built from the top level down
        start = len(s)
        c_out = ch * ch_mult[i]
        for j in range(n_res + 1):
            res(f"decoder.up.{i}.block.{j}", c_in, c_out)
            c_in = c_out
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c_in, c_in, 3)
        ups.append(s[start:])
        del s[start:]
    for group in reversed(ups):  # write decoder.up.0 ... up.3 in index order
        s.extend(group)
    norm("decoder.norm_out", ch)
    conv("decoder.conv_out", 3, ch, 3)
    return s


def _meta_state_dict_specs(
    model_factory: Callable[[], torch.nn.Module], dtype: torch.dtype, skip: tuple[str, ...] = ()
) -> list[Spec]:
    with torch.device("meta"):
        model = model_factory()
    specs = []
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        if not t.dtype.is_floating_point:
            specs.append(Spec(name, tuple(t.shape), torch.int64, "arange"))  # e.g. position_ids
        elif t.dim() == 1:
            specs.append(Spec(name, tuple(t.shape), dtype, "zeros" if name.endswith(".bias") else "ones"))
        elif "embed" in name or name == "shared.weight" or "relative_attention_bias" in name:
            specs.append(Spec(name, tuple(t.shape), dtype, "embed1" if name == "shared.weight" else "embed"))
        else:
            specs.append(Spec(name, tuple(t.shape), dtype, "linear"))
    return specs


def clip_specs(kind: str, dtype: torch.dtype = torch.float16) -> list[Spec]:
    """CLIP-L (ViT-L/14 text, 12 x 768) or CLIP-G (bigG/14 text, 32 x 1280), with text_projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if kind == "l":
        cfg = dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    else:
        cfg = dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            projection_dim=1280,
            hidden_act="gelu",
        )
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **cfg)
    return _meta_state_dict_specs(lambda: CLIPTextModelWithProjection(config), dtype)


def t5xxl_specs(dtype: torch.dtype = torch.bfloat16) -> list[Spec]:
    """google/t5-v1_1-xxl's encoder (24 x 4096, d_ff 10240, 64 heads, gated-gelu, vocab 32128).
    "encoder.embed_tokens.weight" is tied to "shared.weight" and left out (as in the usual
    t5xxl_fp16.safetensors): assigning "shared.weight" sets the one module both names point to."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    )  # fmt: skip
    return _meta_state_dict_specs(lambda: T5EncoderModel(config), dtype, skip=("encoder.embed_tokens.weight",))


# ---------------------------------------------------------------- main


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--double-blocks", type=int, default=1)
    ap.add_argument("--single-blocks", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    build(a.outdir / "flux1-dev-tiny.safetensors", lambda: flux_dit_specs(a.double_blocks, a.single_blocks), a.seed,
          f"FLUX.1-dev DiT, {a.double_blocks} double + {a.single_blocks} single blocks, bf16")  # fmt: skip
    build(a.outdir / "ae.safetensors", ae_specs, a.seed, "FLUX AE, fp32")
    build(a.outdir / "clip_l.safetensors", lambda: clip_specs("l"), a.seed, "CLIP-L, fp16")
    build(a.outdir / "t5xxl.safetensors", t5xxl_specs, a.seed, "T5-XXL encoder, bf16")
    print(f"flux model OK: {a.outdir}")


if __name__ == "__main__":
    main(sys.argv[1:])
