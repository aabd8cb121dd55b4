"""The real CLIP BPE tokenizer (49408 tokens), derived from open_clip's packaged vocabulary file.

No model hub is reachable, but ``open_clip_torch`` ships OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.
From it we rebuild the ``vocab.json`` + ``merges.txt`` pair that Stable Diffusion checkpoints carry,
so prompts tokenize to the same ids as with a real checkpoint.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
# CLIP keeps 49152 - 256 - 2 merges: 49408 = 2 * 256 byte tokens + merges + 2 special tokens.
NUM_MERGES = 49152 - 256 - 2
_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"


def bpe_vocab_path() -> Path:
    """Path of open_clip's packaged BPE file, found without importing open_clip."""
    # `import open_clip` fails when installed with --no-deps; the file is plain package data.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; it provides the CLIP BPE vocabulary")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _BPE_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_BPE_FILENAME} not found in {list(spec.submodule_search_locations)}")


def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible map from each byte to a printable unicode character."""
    # Printable latin-1 bytes map to themselves; the rest are shifted past 255 so that no token
    # contains whitespace or control characters. The order here fixes the first 256 token ids.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


@functools.lru_cache(maxsize=1)
def load_clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Return CLIP's ``(vocab, merges)``: token -> id and the ordered merge rules."""
    with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    # Line 0 is a version header; CLIP uses only the first NUM_MERGES rules after it.
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"unexpected content in {bpe_vocab_path()}")
    byte_tokens = list(bytes_to_unicode().values())
    tokens = [*byte_tokens, *(t + "</w>" for t in byte_tokens), *("".join(m) for m in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived CLIP vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def write_clip_bpe_files(directory: str | Path) -> Path:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (the files real SD checkpoints carry) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = load_clip_bpe()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")
    return directory


def write_clip_tokenizer_files(directory: str | Path, pad_token: str = EOS_TOKEN) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``directory``."""
    directory = write_clip_bpe_files(directory)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def save_clip_tokenizer(directory: str | Path, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Write the tokenizer files into ``directory`` and load them back as a ``CLIPTokenizer``."""
    # transformers 5 silently ignores CLIPTokenizer(vocab_file=..., merges_file=...);
    # from_pretrained on the written directory does read them.
    write_clip_tokenizer_files(directory, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(str(directory))


def clip_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Build the CLIP tokenizer in memory (SD 1.5 / SDXL ``tokenizer``; SDXL ``tokenizer_2`` pads with "!")."""
    vocab, merges = load_clip_bpe()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )
