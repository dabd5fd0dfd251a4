"""Write every tokenizer sd-scripts' FLUX and SD3 scripts ask for into CACHE_DIR, offline, and load each back.

    python make_flow_tokenizers.py CACHE_DIR

sd-scripts' TokenizeStrategy._load_tokenizer (library/strategy_base.py) reads
CACHE_DIR/<model id with "/" replaced by "_"> when --tokenizer_cache_dir CACHE_DIR holds it, and
only goes to the hub otherwise. The ids (library/strategy_flux.py, library/strategy_sd3.py):

    openai/clip-vit-large-patch14              CLIPTokenizer     FLUX + SD3 (CLIP-L)
    laion/CLIP-ViT-bigG-14-laion2B-39B-b160k   CLIPTokenizer     SD3 (CLIP-G; sd3 sets pad_token_id = 0)
    google/t5-v1_1-xxl                         T5TokenizerFast   FLUX + SD3 (T5-XXL)

CLIP-L and CLIP-G: the small hand-written CLIP BPE of make_tokenizer.py (next to this file), the
same vocabulary for both (as the real ones share CLIP's BPE); CLIP-G's special_tokens_map names
"!" (id 0) as its pad token, like laion's. T5: a tiny Unigram model built with the `tokenizers`
package from the captions' word counts (T5's special ids: <pad> 0, </s> 1, <unk> 2; a "$A </s>" post-processor;
Metaspace pre-tokenizer), saved as tokenizer.json + tokenizer_config.json, which the venv's
T5TokenizerFast loads without sentencepiece. Every id stays below T5-XXL's 32128-entry embedding.
Idempotent: a folder that exists is loaded back (checked) and kept. Run it with the venv that will
read the folders: it finishes by loading each one with that venv's transformers.
"""

import json
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tokenizer  # noqa: E402  (the CLIP BPE writer next to this file)

CLIP_L_ID = "openai/clip-vit-large-patch14"
CLIP_G_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
T5_ID = "google/t5-v1_1-xxl"

CORPUS = [  # make_data.py's captions, make_tokenizer.py's words, and a little more text
    "a photo of sks dog",
    "a picture of sks dog on the red background",
    "a photo of sks dog with a blue background",
    "a picture of sks dog in the green background",
    " ".join(make_tokenizer.WORDS),
    "a photo of a cat, a person, a white dog and a black background.",
    "the quick brown fox jumps over the lazy dog",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 , . ! ? ( ) : ; - '",
]


def folder(cache: Path, model_id: str) -> Path:
    return cache / model_id.replace("/", "_")


def make_clip(out: Path, pad_token: str | None) -> None:
    if not (out / "vocab.json").exists():
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tokenizer.main(tmp)  # writes and loads back (prints "tokenizer OK ...")
        if pad_token is not None:
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                data = json.loads((tmp / name).read_text())
                data["pad_token"] = pad_token
                (tmp / name).write_text(json.dumps(data))
        tmp.rename(out)
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(out))
    ids = tok("a photo of sks dog", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and max(ids) < 49408 and ids[0] == tok.bos_token_id, ids[:8]
    print(f"clip tokenizer OK ({len(tok)} tokens, pad {tok.pad_token!r}): {out}")


def make_t5(out: Path) -> None:
    if not (out / "tokenizer.json").exists():
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # A unigram model "trained" by counting: every word of the corpus is one piece, scored by
        # its log frequency; single characters (alone and word-initial) are the fallback, scored
        # far lower. (tokenizers' UnigramTrainer on a corpus this small keeps odd pieces and
        # spells common words letter by letter.)
        counts = Counter(w for line in CORPUS for w in line.lower().split())
        total = sum(counts.values())
        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5's ids 0, 1, 2
        vocab += [("▁" + w, math.log(n / total)) for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        chars = sorted(set("".join(CORPUS)) - {" "})
        vocab += [("▁", -20.0)] + [(c, -20.0) for c in chars] + [("▁" + c, -20.0) for c in chars if ("▁" + c) not in dict(vocab)]
        tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        assert [tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
        tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
        tok.save(str(tmp / "tokenizer.json"))
        special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps({**special, "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 100, "legacy": True})
        )
        tmp.rename(out)
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(str(out))
    enc = tok(["a photo of sks dog", ""], max_length=64, padding="max_length", truncation=True)
    ids, mask = enc.input_ids, enc.attention_mask
    assert len(ids[0]) == 64 and max(max(r) for r in ids) < 32128, ids
    assert ids[0][sum(mask[0]) - 1] == tok.eos_token_id == 1 and ids[0][-1] == tok.pad_token_id == 0, ids[0][:12]
    assert ids[1][0] == 1 and sum(mask[1]) == 1, ids[1][:4]  # the empty caption: "</s>" then padding
    print(f"t5 tokenizer OK ({len(tok)} tokens, 'a photo of sks dog' -> {ids[0][: sum(mask[0])]}): {out}")


def main(cache: Path) -> None:
    import transformers

    cache.mkdir(parents=True, exist_ok=True)
    make_clip(folder(cache, CLIP_L_ID), pad_token=None)
    make_clip(folder(cache, CLIP_G_ID), pad_token="!")
    make_t5(folder(cache, T5_ID))
    print(f"tokenizers OK (transformers {transformers.__version__}): {cache}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
