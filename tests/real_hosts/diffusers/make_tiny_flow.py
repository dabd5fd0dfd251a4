"""Build tiny random-weight flow-matching pipeline folders offline, for diffusers' flow DreamBooth LoRA examples.

    python make_tiny_flow.py OUTDIR KIND      KIND: flux, flux2, sd3, qwen_image, z_image, lumina2 or all

Writes OUTDIR/<kind>/, saved with the pipeline class's save_pretrained so that `<Pipeline>.from_pretrained(folder)`
and the scripts' `<Class>.from_pretrained(folder, subfolder=...)` load it. A folder whose model_index.json exists is
kept (idempotent); a half-built one is removed and rebuilt.

The models use the small configs of diffusers' own pipeline tests (tests/pipelines/<kind>/test_*.py
get_dummy_components), with vocabulary sizes and special-token ids taken from the tokenizers built here instead of
the hub's test tokenizers. Every tokenizer is trained here with the `tokenizers` package on a few captions plus the
prompt templates the pipelines wrap prompts in, inside the transformers class each script loads (its normalizer and
pre-tokenizer), then rebuilt from the trained vocabulary and saved with save_pretrained:

    flux      CLIPTokenizer (byte-level BPE, "</w>")   + T5TokenizerFast (Unigram; pieces from a trained BPE)
    sd3       CLIPTokenizer x2                         + T5TokenizerFast
    flux2     PixtralProcessor: a byte-level BPE tokenizer (Mistral/tekken-like special tokens) with a small
              Mistral-style chat template, and a Pixtral image processor (unused: no images)
    qwen_image Qwen2Tokenizer (byte-level BPE), sized so the pipeline's fixed template prefix is 34 tokens as with
              the real Qwen2.5-VL tokenizer (QwenImagePipeline drops the first 34 positions)
    z_image   Qwen2Tokenizer with a small Qwen3-style chat template (ZImagePipeline calls apply_chat_template)
    lumina2   GemmaTokenizer (BPE, byte fallback), found by AutoTokenizer

Schedulers: FlowMatchEulerDiscreteScheduler with the settings the real checkpoints' scheduler_config.json are
believed to hold (assumptions, not read from the hub here):
    flux      FLUX.1-dev: shift 3.0, use_dynamic_shifting, base_shift 0.5, max_shift 1.15, seq len 256..4096
    flux2     FLUX.2-dev: assumed the same as FLUX.1-dev (Flux2Pipeline computes its own mu at inference)
    sd3       SD3-medium: shift 3.0, no dynamic shifting
    qwen_image Qwen-Image: shift 1.0, use_dynamic_shifting, base_shift 0.5, max_shift 0.9, seq len 256..8192,
              shift_terminal 0.02, time_shift_type exponential
    z_image   Z-Image(-Turbo): shift 3.0, no dynamic shifting
    lumina2   Lumina-Image-2.0: shift 6.0, no dynamic shifting
The training scripts only read num_train_timesteps, timesteps and sigmas from it (a static shift changes the
sigmas; dynamic shifting only matters at inference).
"""

import json
import shutil
import sys
from pathlib import Path

import torch  # noqa: F401  (torch first, before transformers/diffusers)

KINDS = ("flux", "flux2", "sd3", "qwen_image", "z_image", "lumina2")

CAPTIONS = [
    "a photo of sks dog",
    "a photo of dog",
    "a photo of a dog",
    "a picture of sks dog on the red background",
    "a photo of sks dog with a blue background",
    "a red cat on sofa",
    "a blue cat",
    "a photo of a cat, a person, a white dog and a black background.",
    "the quick brown fox jumps over the lazy dog",
]
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 , . ! ? ( ) : ; - ' \" / _ [ ] < > | = +"

# The text the pipelines wrap a prompt in (diffusers 0.42.1: QwenImagePipeline.prompt_template_encode,
# Lumina2Pipeline.system_prompt, flux2's SYSTEM_MESSAGE), in the corpus so that it tokenizes compactly.
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial"
    " relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_IMAGE_DROP_IDX = 34  # QwenImagePipeline.prompt_template_encode_start_idx
LUMINA2_SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment"
    " based on textual prompts or user prompts."
)
FLUX2_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)

# A Qwen3-style chat template, reduced to what ZImagePipeline uses (user turns, add_generation_prompt,
# enable_thinking): "<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n".
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# A Mistral-Small-3.1-style chat template, reduced to what Flux2Pipeline uses (a system turn and user turns whose
# content is a list of {"type": "text"} / {"type": "image"} parts or a string).
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' }}{%- endif %}"
    "{%- for part in parts %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- else %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if message['role'] == 'system' %}{{- '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[/INST]' }}"
    "{%- else %}{{- eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def corpus(templates=True):
    if not templates:
        return CAPTIONS * 8 + [ALPHABET]
    texts = list(CAPTIONS)
    texts += [QWEN_IMAGE_TEMPLATE.format(c) for c in CAPTIONS[:3]]
    texts += [LUMINA2_SYSTEM_PROMPT + " <Prompt Start> " + c for c in CAPTIONS[:3]]
    texts += [FLUX2_SYSTEM_MESSAGE]
    texts += [f"<|im_start|>user\n{c}<|im_end|>\n<|im_start|>assistant\n" for c in CAPTIONS[:3]]
    return texts * 8 + [ALPHABET]


def _merges(model):
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def _train(tokenizer, trainer, texts, pre_tokenizer=None):
    """Train the tokenizers.Tokenizer inside a transformers tokenizer (its normalizer and pre-tokenizer, or
    `pre_tokenizer` for the training only) with a `tokenizers` trainer; return the trained model's JSON."""
    backend = tokenizer.backend_tokenizer
    if pre_tokenizer is not None:
        backend.pre_tokenizer = pre_tokenizer
    backend.train_from_iterator(texts, trainer)
    return json.loads(backend.to_str())["model"]


def make_clip_tokenizer():
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    special = ["<|startoftext|>", "<|endoftext|>"]
    model = _train(
        CLIPTokenizer(),
        trainers.BpeTrainer(
            vocab_size=1000,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            end_of_word_suffix="</w>",
            show_progress=False,
        ),
        corpus(templates=False),
    )
    return CLIPTokenizer(vocab=model["vocab"], merges=_merges(model), model_max_length=77)


def make_t5_tokenizer():
    from tokenizers import Tokenizer, models, trainers
    from transformers import T5TokenizerFast

    # T5's tokenizer is a Unigram model. The `tokenizers` Unigram trainer collapses to single characters on a corpus
    # this small, so the pieces come from a BPE trained (with T5's Metaspace pre-tokenizer) on the captions; as
    # Unigram pieces they all get the same log-probability, so Viterbi picks the fewest pieces (whole words).
    special = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = T5TokenizerFast(extra_ids=0).backend_tokenizer.pre_tokenizer
    bpe.train_from_iterator(
        corpus(templates=False), trainers.BpeTrainer(vocab_size=1000, special_tokens=special, show_progress=False)
    )
    pieces = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    assert [p for p, _ in pieces[:3]] == special, pieces[:3]
    vocab = [(p, 0.0) for p in special] + [(p, -10.0) for p, _ in pieces[3:]]
    # 4 sentinel tokens (<extra_id_N>) rather than T5's 100: enough to keep the class's layout
    extra = 4
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra - 1, -1, -1)]
    return T5TokenizerFast(vocab=vocab, extra_ids=extra, model_max_length=512)


def make_qwen2_tokenizer(extra_special, chat_template=None):
    from tokenizers import pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special]
    model = _train(
        Qwen2Tokenizer(),
        trainers.BpeTrainer(
            vocab_size=1200,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
        corpus(),
    )
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=_merges(model),
        extra_special_tokens=special[1:],
        model_max_length=32768,
        **kwargs,
    )


def make_gemma_tokenizer():
    from tokenizers import pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]  # Gemma's ids 0..
    alphabet = sorted(set("".join(corpus()).replace(" ", "\u2581")))
    # GemmaTokenizer has no word split (spaces become "\u2581" and BPE runs on the whole text, as SentencePiece):
    # trained with a split before each "\u2581" so that pieces stay within words ("\u2581photo")
    model = _train(
        GemmaTokenizer(),
        trainers.BpeTrainer(vocab_size=1000, special_tokens=special, initial_alphabet=alphabet, show_progress=False),
        corpus(),
        pre_tokenizer=pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True),
    )
    vocab = dict(model["vocab"])
    for b in range(256):  # GemmaTokenizer's BPE falls back to <0xNN> byte tokens for unseen characters
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return GemmaTokenizer(
        vocab=vocab,
        merges=_merges(model),
        extra_special_tokens=special[5:],
        add_bos_token=True,  # as Gemma's: "<bos>" first
        add_eos_token=False,
        model_max_length=8192,
        padding_side="right",
    )


def make_mistral_processor():
    """Flux2's PixtralProcessor: a byte-level BPE tokenizer with tekken-like special tokens, a chat template and a
    Pixtral image processor (built with the PIL backend; saved as "PixtralImageProcessor", it loads back with the
    torchvision backend, which the stub satisfies: text-only prompts never reach it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PixtralImageProcessorPil, PixtralProcessor, PreTrainedTokenizerFast

    special = [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "[INST]",
        "[/INST]",
        "[IMG]",
        "[IMG_BREAK]",
        "[IMG_END]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
    ]
    backend = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=1200,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=special[4:],
        model_max_length=131072,
        padding_side="left",
    )
    image_processor = PixtralImageProcessorPil(patch_size=6, size={"longest_edge": 30})
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=6,
        spatial_merge_size=1,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


def clip_text_config(tokenizer):
    from transformers import CLIPTextConfig

    vocab = tokenizer.get_vocab()
    # diffusers' tests: hidden 32, intermediate 37, 4 heads, 5 layers, projection 32 (2 layers here: faster)
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=32,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def t5_encoder(tokenizer, d_model=32):
    from transformers import T5Config, T5EncoderModel

    # hf-internal-testing/tiny-random-t5's shape: d_model 32, d_ff 37, d_kv 8, 4 heads, 8 buckets (2 layers here)
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def small_vae(latent_channels):
    from diffusers import AutoencoderKL

    # flux/sd3/lumina2 tests: one block of 4 channels (no downsampling)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = make_clip_tokenizer(), make_t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # as FLUX.1-dev (the script then passes --guidance_scale as the guidance input)
        axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    torch.manual_seed(0)
    text_encoder_2 = t5_encoder(tokenizer_2)
    torch.manual_seed(0)
    vae = small_vae(latent_channels=1)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_3 = make_clip_tokenizer(), make_t5_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        # T5 width 128 (the test's 32 would cut the two CLIPs' concatenated 64-wide hidden states down to CLIP-L's
        # 32): as in SD3 (2048 zero-padded to T5's 4096), the CLIP part is zero-padded to T5's width
        joint_attention_dim=128,
        pooled_projection_dim=64,
        out_channels=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(clip_text_config(tokenizer))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer))
    torch.manual_seed(0)
    text_encoder_3 = t5_encoder(tokenizer_3, d_model=128)
    torch.manual_seed(0)
    vae = small_vae(latent_channels=4)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
    )


def build_flux2():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    processor = make_mistral_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "[IMG]")}
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        # FLUX.2 stacks the text encoder's hidden states 10, 20 and 30 per token (3 x 5120): here 3 layers of 16,
        # read with --text_encoder_out_layers 1 2 3 (diffusers' test: 1 layer, joint_attention_dim 16)
        joint_attention_dim=48,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
    )
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tok),
            "hidden_size": 16,
            "intermediate_size": 37,
            "max_position_embeddings": 512,
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        image_seq_length=4,
        vision_feature_layer=-1,
        image_token_index=ids["[IMG]"],
    )
    torch.manual_seed(0)
    text_encoder = Mistral3ForConditionalGeneration(config)
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=processor, transformer=transformer)


def build_qwen_image():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = make_qwen2_tokenizer(vision)
    prefix = QWEN_IMAGE_TEMPLATE.split("{}")[0]
    n = len(tokenizer(prefix).input_ids)
    assert n == QWEN_IMAGE_DROP_IDX, f"the template prefix is {n} tokens, QwenImagePipeline drops {QWEN_IMAGE_DROP_IDX}"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in vision}
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=4 * 6,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|image_pad|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def build_z_image():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = make_qwen2_tokenizer([], chat_template=QWEN3_CHAT_TEMPLATE)
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty: fixed as diffusers' test does
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token.data))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token.data))
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[32, 64],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    torch.manual_seed(0)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        )
    )
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def build_lumina2():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = make_gemma_tokenizer()
    torch.manual_seed(0)
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=8,
        num_layers=2,
        num_attention_heads=1,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2],
        cap_feat_dim=8,
    )
    torch.manual_seed(0)
    vae = small_vae(latent_channels=4).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0)
    torch.manual_seed(0)
    text_encoder = Gemma2Model(
        Gemma2Config(
            head_dim=4,
            hidden_size=8,
            intermediate_size=8,
            num_attention_heads=2,
            num_hidden_layers=2,
            num_key_value_heads=2,
            sliding_window=2,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    return Lumina2Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


BUILDERS = {
    "flux": build_flux,
    "flux2": build_flux2,
    "sd3": build_sd3,
    "qwen_image": build_qwen_image,
    "z_image": build_z_image,
    "lumina2": build_lumina2,
}


def check(kind, folder):
    """Load the folder back with its pipeline class and encode a prompt, as the scripts' text-encoding step does."""
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder)
    with torch.no_grad():
        if kind == "flux":
            embeds = pipe.encode_prompt("a photo of sks dog", prompt_2=None, max_sequence_length=16)[0]
        elif kind == "sd3":
            embeds = pipe.encode_prompt(
                "a photo of sks dog", None, None, do_classifier_free_guidance=False, max_sequence_length=16
            )[0]
        elif kind == "flux2":
            embeds = pipe.encode_prompt("a photo of sks dog", max_sequence_length=48, text_encoder_out_layers=(1, 2, 3))[0]
        elif kind == "qwen_image":
            embeds = pipe.encode_prompt("a photo of sks dog", max_sequence_length=16)[0]
        elif kind == "z_image":
            embeds = pipe.encode_prompt("a photo of sks dog", do_classifier_free_guidance=False, max_sequence_length=64)[0][0]
        else:
            embeds = pipe.encode_prompt("a photo of sks dog", do_classifier_free_guidance=False, max_sequence_length=16)[0]
    assert torch.isfinite(embeds).all(), kind
    print(f"{kind}: {folder} loads ({index['_class_name']}); prompt embeddings {tuple(embeds.shape)}")


def build(out, kind):
    folder = out / kind
    if (folder / "model_index.json").exists():
        print(f"{kind}: {folder} exists, kept")
        return
    shutil.rmtree(folder, ignore_errors=True)
    partial = out / f"{kind}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    BUILDERS[kind]().save_pretrained(partial)
    check(kind, partial)
    partial.rename(folder)
    print(f"built {folder}")


def main():
    out, kind = Path(sys.argv[1]), sys.argv[2]
    kinds = KINDS if kind == "all" else (kind,)
    for k in kinds:
        if k not in BUILDERS:
            sys.exit(f"unknown KIND {k!r}: one of {', '.join(KINDS)} or all")
    out.mkdir(parents=True, exist_ok=True)
    for k in kinds:
        build(out, k)


if __name__ == "__main__":
    main()
