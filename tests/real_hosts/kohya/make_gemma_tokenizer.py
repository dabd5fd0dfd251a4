"""Write the Gemma tokenizer sd-scripts' lumina_train_network.py asks for into CACHE_DIR, offline, and load it back.

    python make_gemma_tokenizer.py CACHE_DIR

Lumina's tokenizer is not read through TokenizeStrategy._load_tokenizer (the "<id with / as _>"
folder of make_flow_tokenizers.py): library/strategy_lumina.py calls
AutoTokenizer.from_pretrained("google/gemma-2-2b", cache_dir=--tokenizer_cache_dir), i.e. the
Hugging Face hub cache layout. So this writes

    CACHE_DIR/models--google--gemma-2-2b/refs/main                 a revision id
    CACHE_DIR/models--google--gemma-2-2b/snapshots/<rev>/...       tokenizer.json, tokenizer_config.json,
                                                                  special_tokens_map.json

which transformers resolves without the network when HF_HUB_OFFLINE=1 (rebuild_flow.sh sets it; with
the network merely unreachable it would retry the hub first). The tokenizer: a small BPE trained with
the `tokenizers` package on make_flow_tokenizers.py's corpus, Gemma's special ids (<pad> 0, <eos> 1,
<bos> 2, <unk> 3), SentencePiece-style "▁" word marks; tokenizer_config names GemmaTokenizer, so
AutoTokenizer gives GemmaTokenizerFast, which prepends <bos> as Gemma's does. Every id stays far below
Gemma-2's 256000-entry embedding. Idempotent: an existing snapshot is loaded back (checked) and kept.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_flow_tokenizers import CORPUS  # noqa: E402

GEMMA_ID = "google/gemma-2-2b"
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0, 1, 2, 3


def repo_dir(cache: Path, model_id: str) -> Path:
    return cache / ("models--" + model_id.replace("/", "--"))


def write(snapshot: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(CORPUS)) | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=1, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL] == [0, 1, 2, 3]
    snapshot.mkdir(parents=True)
    tok.save(str(snapshot / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
    (snapshot / "special_tokens_map.json").write_text(json.dumps(special))
    config = {**special, "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "model_max_length": 8192, "padding_side": "left", "clean_up_tokenization_spaces": False}  # fmt: skip
    (snapshot / "tokenizer_config.json").write_text(json.dumps(config))


def main(cache: Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: resolve from the cache only
    import transformers
    from transformers import AutoTokenizer

    repo = repo_dir(cache, GEMMA_ID)
    if not (repo / "refs" / "main").exists():
        tmp = repo.with_name(repo.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        staging = tmp / "snapshots" / "staging"
        write(staging)
        digest = hashlib.sha1()
        for name in sorted(p.name for p in staging.iterdir()):
            digest.update(name.encode() + (staging / name).read_bytes())
        rev = digest.hexdigest()  # a 40-hex "commit" named by the content
        staging.rename(tmp / "snapshots" / rev)
        (tmp / "refs").mkdir()
        (tmp / "refs" / "main").write_text(rev)
        cache.mkdir(parents=True, exist_ok=True)
        tmp.rename(repo)
    tok = AutoTokenizer.from_pretrained(GEMMA_ID, cache_dir=str(cache))  # exactly strategy_lumina's call
    tok.padding_side = "right"
    enc = tok(
        ["a photo of sks dog", ""],
        max_length=64,
        padding="max_length",
        truncation=True,
        pad_to_multiple_of=8,
        return_tensors="pt",
    )
    ids, mask = enc.input_ids, enc.attention_mask
    n = int(mask[0].sum())
    assert type(tok).__name__ == "GemmaTokenizerFast", type(tok)
    assert ids.shape == (2, 64) and int(ids.max()) < 256000, ids.shape
    assert ids[0, 0] == tok.bos_token_id == 2 and ids[0, -1] == tok.pad_token_id == 0, ids[0, :12]
    assert int(mask[1].sum()) == 1 and ids[1, 0] == 2, ids[1, :4]  # the empty caption: <bos> then padding
    print(f"gemma tokenizer OK ({type(tok).__name__}, {len(tok)} tokens, 'a photo of sks dog' -> {ids[0, :n].tolist()}, "
          f"transformers {transformers.__version__}): {repo}")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
