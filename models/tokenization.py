"""Tokenizers for the text encoders, built on the `tokenizers` library (no transformers at run time).

- `load_tokenizer(path)`: a Hugging Face tokenizer folder (with tokenizer.json) or a tokenizer.json file,
  e.g. the LLaVA-LLaMA-3 tokenizer HunyuanVideo uses.
- `gguf_tokenizer(path)`: the byte-level BPE tokenizer a LLaMA-3 GGUF file carries in its metadata
  (`tokenizer.ggml.*`), rebuilt with the LLaMA-3 split pattern, so a GGUF text encoder needs no tokenizer.json.
- `clip_l_tokenizer()`: the CLIP ViT-L/14 tokenizer shipped in `models/vocab/clip_l/tokenizer.json`, made by
  `build_clip_tokenizer` from OpenAI's BPE vocabulary `bpe_simple_vocab_16e6.txt.gz` (MIT licence). To rebuild it:
  `python -m kineflow.models.tokenization bpe_simple_vocab_16e6.txt.gz models/vocab/clip_l/tokenizer.json`.

`TextTokenizer.encode` returns right-padded `input_ids` and `attention_mask` tensors, the way the reference
pipelines call Hugging Face tokenizers with `padding="max_length", truncation=True`.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import InputFileError, ModelFileError

VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
CLIP_L_TOKENIZER_FILE = VOCAB_DIR / "clip_l" / "tokenizer.json"

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
# OpenAI's file holds more merges than CLIP uses: the vocabulary is 49408 = 256 bytes + 256 bytes with the
# end-of-word mark + 48894 merges + 2 special tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2
# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, other symbol runs.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the pad id, producing fixed-length id and mask tensors."""

    def __init__(self, tokenizer: Tokenizer, pad_id: int, source: str = ""):
        self.tokenizer = tokenizer
        self.pad_id = int(pad_id)
        self.source = source

    def ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text, untruncated."""
        self.tokenizer.no_truncation()
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode(self, texts: str | Sequence[str], max_length: int, pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both int64 [B, L]. Truncated to `max_length` (special tokens added by the
        tokenizer are kept, as transformers does); right-padded with `pad_id` to `max_length`, or only to the
        longest text when `pad` is False."""
        if isinstance(texts, str):
            texts = [texts]
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        try:
            encodings = self.tokenizer.encode_batch(list(texts))
        finally:
            self.tokenizer.no_truncation()
        length = max_length if pad else max(len(e.ids) for e in encodings)
        input_ids = torch.full((len(encodings), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), length), dtype=torch.long)
        for row, enc in enumerate(encodings):
            input_ids[row, : len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.long)
            mask[row, : len(enc.ids)] = 1
        return input_ids, mask


# --------------------------------------------------------------------------- loading
def _special_token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pad_id(tokenizer: Tokenizer, folder: Path | None, pad_token: str | int | None) -> int:
    """Pad id: the explicit argument, tokenizer.json's padding setting, the folder's tokenizer_config.json or
    special_tokens_map.json `pad_token`, else 0 (padded positions are masked, so the value only reaches
    masked rows)."""
    if isinstance(pad_token, int):
        return pad_token
    if pad_token is None and tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    candidates = [pad_token]
    if folder is not None:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config = folder / name
            if config.is_file():
                try:
                    settings = json.loads(config.read_text(encoding="utf-8"))
                except ValueError as exc:
                    raise ModelFileError(f"{config} is not valid JSON: {exc}") from None
                candidates.append(_special_token_content(settings.get("pad_token")))
    for token in candidates:
        if token is not None:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ModelFileError(f"pad token {token!r} is not in the tokenizer's vocabulary")
            return token_id
    return 0


def load_tokenizer(path: str | os.PathLike, pad_token: str | int | None = None) -> TextTokenizer:
    """Load a tokenizer from a Hugging Face tokenizer folder (containing tokenizer.json), a tokenizer.json file,
    or a .gguf file that carries one."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return gguf_tokenizer(path)
    folder = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        present = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
        raise ModelFileError(
            f"tokenizer file not found: expected {file}"
            + (f" (the folder holds: {', '.join(present)})" if present else " (the folder does not exist)")
            + ". Put the model's tokenizer.json there (it comes with the model's Hugging Face files, next to "
            "config.json), or pass the path of a tokenizer.json file."
        )
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises bare Exceptions on malformed files
        raise ModelFileError(f"{file} is not a valid tokenizer.json: {exc}") from exc
    return TextTokenizer(tokenizer, _pad_id(tokenizer, folder, pad_token), str(file))


# LLaMA-3's pre-tokenisation (as in its tokenizer.json and llama.cpp's "llama-bpe"): contractions, letter runs
# with one leading non-letter, digit groups of up to three, symbol runs, newlines, other whitespace.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPECIAL_TYPES = (3, 4)  # llama.cpp token types CONTROL and USER_DEFINED: matched whole, never split


def gguf_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """The tokenizer stored in a LLaMA-3 GGUF file's metadata: vocabulary, merges, token types, BOS and padding."""
    from . import gguf

    path = Path(path)
    header = gguf.read_header(path)
    meta = header.metadata
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in ("llama-bpe", "llama3", "default"):
        raise ModelFileError(
            f"{path.name!r} carries a {kind or 'missing'!r} tokenizer (pre-tokenizer {pre!r}); KineFlow rebuilds "
            "only LLaMA-3's byte-level BPE from GGUF metadata. Name the model's tokenizer.json folder in Load Text "
            "Encoders' llm_tokenizer instead")
    tokens = gguf.read_array(path, "tokenizer.ggml.tokens") or []
    merges = gguf.read_array(path, "tokenizer.ggml.merges") or []
    types = gguf.read_array(path, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or not merges:
        raise ModelFileError(f"{path.name!r} has no complete tokenizer in its metadata (tokens: {len(tokens)}, "
                             f"merges: {len(merges)}); name a tokenizer.json folder in Load Text Encoders' llm_tokenizer")
    tokenizer = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                              ignore_merges=True, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([t for t, kind in zip(tokens, types) if kind in _GGUF_SPECIAL_TYPES])
    if meta.get("tokenizer.ggml.add_bos_token", "True") == "True" and "tokenizer.ggml.bos_token_id" in meta:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]} $A", special_tokens=[(tokens[bos_id], bos_id)])
    return TextTokenizer(tokenizer, int(meta.get("tokenizer.ggml.padding_token_id", 0)), str(path))


def clip_l_tokenizer() -> TextTokenizer:
    """The shipped CLIP ViT-L/14 tokenizer: lower-cases, BOS 49406 / EOS 49407, pads with 49407 to 77."""
    if not CLIP_L_TOKENIZER_FILE.is_file():
        raise ModelFileError(f"the CLIP tokenizer shipped with KineFlow is missing: expected {CLIP_L_TOKENIZER_FILE}. "
                             "Reinstall the node pack, or rebuild it with `python -m kineflow.models.tokenization "
                             "bpe_simple_vocab_16e6.txt.gz <that path>`.")
    return load_tokenizer(CLIP_L_TOKENIZER_FILE)


# --------------------------------------------------------------------------- building the CLIP tokenizer
def byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes are mapped, in increasing
    order, to the code points from 256 upward.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def read_openai_bpe(path: str | os.PathLike, num_merges: int = CLIP_NUM_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from OpenAI's `bpe_simple_vocab_16e6.txt(.gz)` (first line is a version header)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = raw.decode("utf-8").split("\n")[1 : num_merges + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != num_merges or any(len(m) != 2 for m in merges):
        raise InputFileError(f"{path} is not an OpenAI CLIP BPE file: expected {num_merges} merge lines of two "
                             f"symbols after the version header, found {len(merges)} lines")
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]],
                         max_length: int = CLIP_MAX_LENGTH) -> Tokenizer:
    """CLIP's tokenizer: NFC + whitespace collapse + lower-case, CLIP's split, byte-level BPE with a `</w>`
    end-of-word suffix, `<|startoftext|> ... <|endoftext|>` around the text, truncation to `max_length` and
    padding with `<|endoftext|>` (the convention of openai/clip-vit-large-patch14)."""
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                              unk_token=CLIP_EOS, fuse_unk=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase(),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.add_special_tokens([CLIP_BOS, CLIP_EOS])
    bos, eos = vocab[CLIP_BOS], vocab[CLIP_EOS]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}", special_tokens=[(CLIP_BOS, bos), (CLIP_EOS, eos)])
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=eos, pad_token=CLIP_EOS, length=max_length)
    return tokenizer


def write_clip_tokenizer(bpe_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Build the CLIP tokenizer from OpenAI's BPE file and save it as tokenizer.json (atomically)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    build_clip_tokenizer(*read_openai_bpe(bpe_path)).save(str(tmp))
    os.replace(tmp, out_path)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m kineflow.models.tokenization BPE_SIMPLE_VOCAB_16E6.TXT.GZ OUT/tokenizer.json")
    write_clip_tokenizer(sys.argv[1], sys.argv[2])
