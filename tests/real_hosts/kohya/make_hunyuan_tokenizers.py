"""Write the two tokenizers sd-scripts' hunyuan_image_train_network.py asks for into CACHE_DIR, offline.

    python make_hunyuan_tokenizers.py CACHE_DIR

HunyuanImage asks for each tokenizer twice, by two routes:
  - its TokenizeStrategy through _load_tokenizer: CACHE_DIR/<model id with "/" as "_"> when
    --tokenizer_cache_dir CACHE_DIR holds it;
  - its model loaders (load_qwen2_5_vl, load_byt5) by the bare hub id, i.e. the Hugging Face hub
    cache: CACHE_DIR/models--<org>--<name>/snapshots/<rev>/, resolved offline when HF_HUB_OFFLINE=1
    and HF_HUB_CACHE=CACHE_DIR (rebuild_flow.sh sets both for this script).
Both get the same files:

    Qwen/Qwen2.5-VL-7B-Instruct  Qwen2Tokenizer: a byte-level BPE trained with the `tokenizers` package
                                 on make_flow_tokenizers.py's corpus and Qwen's prompt template, plus
                                 Qwen's <|endoftext|>, <|im_start|>, <|im_end|>. Kohya drops the
                                 template's first 34 tokens (the real tokenizer's count); this small
                                 vocabulary splits the template into more than 34, so the caption
                                 itself is never dropped (checked).
    google/byt5-small            ByT5Tokenizer (bytes: it needs no vocabulary file). The loader adds
                                 the colour and font tokens itself; make_hunyuan_model.py sized the
                                 embedding for the same count.

Every id stays below Qwen2.5-VL's 152064-entry embedding. Idempotent: existing folders are loaded back
(checked) and kept. Run it with the venv that will read them.
"""

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_flow_tokenizers import CORPUS  # noqa: E402

QWEN_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
BYT5_ID = "google/byt5-small"
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# hunyuan_image_text_encoder.get_qwen_tokens' template (the caption goes in for {})
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>"
)
DROPPED = 34  # hunyuan_image_text_encoder.PROMPT_TEMPLATE_ENCODE_START_IDX


def write_qwen(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(CORPUS * 4 + [TEMPLATE.format(c) for c in CORPUS], trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)  # vocab.json + merges.txt, GPT-2's byte alphabet like Qwen's
        tok = Qwen2Tokenizer(
            f"{tmp}/vocab.json", f"{tmp}/merges.txt", unk_token=None, bos_token=None,
            eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        )  # fmt: skip
        tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
        tok.save_pretrained(str(folder))


def write_byt5(folder: Path) -> None:
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(str(folder))


def hub_snapshot(cache: Path, model_id: str, source: Path) -> Path:
    """Copy SOURCE's files into the hub cache layout, the revision named by their content."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    if (repo / "refs" / "main").exists():
        return repo
    digest = hashlib.sha1()
    for f in sorted(source.iterdir()):
        digest.update(f.name.encode() + f.read_bytes())
    rev = digest.hexdigest()
    tmp = repo.with_name(repo.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp / "snapshots" / rev)
    (tmp / "refs").mkdir()
    (tmp / "refs" / "main").write_text(rev)
    tmp.rename(repo)
    return repo


def main(cache: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported
    os.environ["HF_HUB_CACHE"] = str(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for model_id, write in ((QWEN_ID, write_qwen), (BYT5_ID, write_byt5)):
        folder = cache / model_id.replace("/", "_")
        if not folder.exists():
            staging = folder.with_name(folder.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            write(staging)
            staging.rename(folder)
        hub_snapshot(cache, model_id, folder)

    from transformers import AutoTokenizer, Qwen2Tokenizer

    for route in (str(cache / QWEN_ID.replace("/", "_")), QWEN_ID):  # _load_tokenizer's folder, the loader's hub id
        qwen = Qwen2Tokenizer.from_pretrained(route)
        enc = qwen([TEMPLATE.format("a photo of sks dog"), TEMPLATE.format("")], padding=True, return_tensors="pt")
        n_template = len(qwen(TEMPLATE.format(""))["input_ids"])
        caption = qwen.decode(enc.input_ids[0][DROPPED:][enc.attention_mask[0][DROPPED:].bool()])
        assert "a photo of sks dog" in caption, caption  # kohya's dropped 34 leave the caption whole
        assert n_template > DROPPED + 1 and int(enc.input_ids.max()) < 152064, (n_template, enc.input_ids.max())
    for route in (str(cache / BYT5_ID.replace("/", "_")), BYT5_ID):
        byt5 = AutoTokenizer.from_pretrained(route)
        assert type(byt5).__name__ == "ByT5Tokenizer" and len(byt5) == 384, (type(byt5), len(byt5))
    print(f"hunyuan tokenizers OK (Qwen2Tokenizer {len(qwen)} tokens, template {n_template} tokens of which "
          f"kohya drops {DROPPED}; ByT5Tokenizer {len(byt5)}): {cache}")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
