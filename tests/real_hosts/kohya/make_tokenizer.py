"""Write a small CLIP BPE tokenizer (vocab.json + merges.txt) to OUTDIR, offline, and load it back.

    python make_tokenizer.py OUTDIR

OUTDIR is <tokcache>/openai_clip-vit-large-patch14 (what sd-scripts' --tokenizer_cache_dir reads).
The files are written by hand, not by save_pretrained, so any transformers version (4.36 of
sd-scripts v0.8.7, 4.54 of main, 5.x) reads them; run it with the venv that will read them anyway,
because the script finishes by loading the folder with that venv's CLIPTokenizer.
The vocabulary: CLIP's 256 byte symbols, each also with the end-of-word mark, merges that spell
each caption word as one token, and the two special tokens; all ids < 49408 (CLIP ViT-L/14 vocab).
"""

import json
import sys
from pathlib import Path

WORDS = (
    "a",
    "photo",
    "of",
    "sks",
    "dog",
    "cat",
    "person",
    "picture",
    "red",
    "blue",
    "green",
    "on",
    "the",
    "in",
    "with",
    "background",
    "white",
    "black",
)


def bytes_to_unicode():  # the same table as CLIP / GPT-2
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    symbols = bytes_to_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: ((a b) c) ... </w>
            merge = (parts[0], parts[1])
            token = parts[0] + parts[1]
            if merge not in merges:
                merges.append(merge)
            if token not in vocab_list:
                vocab_list.append(token)
            parts = [token] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    assert len(vocab) == len(vocab_list) and len(vocab) < 49408
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **special,
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "do_lower_case": True,
                "clean_up_tokenization_spaces": True,
                "errors": "replace",
                "add_prefix_space": False,
            }
        )
    )

    import transformers
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(out))
    ids = tok("a photo of sks dog", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == vocab["<|startoftext|>"] and ids[6] == vocab["<|endoftext|>"], ids[:8]
    assert ids[1:6] == [vocab[w + "</w>"] for w in ("a", "photo", "of", "sks", "dog")], ids[:8]
    print(f"tokenizer OK ({len(vocab)} tokens, transformers {transformers.__version__}): {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
