"""The tokenizer: a Hugging Face `tokenizer.json` read through `tokenizers`, nothing fetched.

`Tokenizer.load(path)` takes the official LLaDA tokenizer as-is; `build_demo_tokenizer()` builds a
small byte-level BPE with the same special tokens for tests, the demo and the `tiny` model.
Special ids are always looked up by their text (DESIGN.md 1.1), never hard-coded.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

# name -> token text (DESIGN.md 1.1). `<|endoftext|>` is also the pad token.
SPECIAL_TOKENS = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
    "mask": "<|mdm_mask|>",
}
FILENAME = "tokenizer.json"

# LLaMA-3 style pre-tokenization (newline runs stay together, so "\n\n" is one piece).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEMO_VOCAB_LIMIT = 2048  # the `tiny` model's vocab_size, specials included


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the LLaDA special ids.

    `encode` adds no BOS/EOS and reads special-token text inside data as plain text, so a
    caption that happens to contain "<|eot_id|>" cannot inject structure (the templates insert
    special ids themselves).
    """

    def __init__(self, json_text: str, *, source: str = "<memory>"):
        self._json = json_text
        self._source = source
        try:
            tok = tokenizers.Tokenizer.from_str(json_text)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ValueError(f"{source}: not a valid tokenizer.json ({e})") from e
        tok.encode_special_tokens = True
        self._tok = tok
        ids = {}
        for name, text in SPECIAL_TOKENS.items():
            i = tok.token_to_id(text)
            if i is None:
                raise ValueError(
                    f"{source}: the tokenizer lacks the special token {text!r} ({name})"
                )
            ids[name] = int(i)
        self._ids = ids
        vocab = tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1

    # -- construction and persistence ---------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a directory holding `tokenizer.json`, or from the file itself."""
        path = os.fspath(path)
        file = os.path.join(path, FILENAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer file at {file}")
        with open(file, encoding="utf-8") as f:
            return cls(f.read(), source=file)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes `tokenizer.json` (the loaded text, unchanged) into `directory`; returns it."""
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(os.fspath(directory), FILENAME)
        tmp = file + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(self._json)
        os.replace(tmp, file)  # never leave a half-written tokenizer behind
        return file

    def to_json(self) -> str:
        return self._json

    def __getstate__(self):  # picklable for worker processes
        return {"json": self._json, "source": self._source}

    def __setstate__(self, state):
        self.__init__(state["json"], source=state["source"])

    def __repr__(self) -> str:
        return f"Tokenizer({self._source}, vocab_size={self.vocab_size})"

    # -- text <-> ids ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        """Embedding rows the tokenizer needs: the largest id + 1 (added tokens included)."""
        return self._vocab_size

    # -- special ids ------------------------------------------------------------------------------
    @property
    def mask_id(self) -> int:
        return self._ids["mask"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def pad_id(self) -> int:
        return self._ids["eos"]

    @property
    def start_header_id(self) -> int:
        return self._ids["start_header"]

    @property
    def end_header_id(self) -> int:
        return self._ids["end_header"]

    @property
    def eot_id(self) -> int:
        return self._ids["eot"]

    @property
    def placeholder_id(self) -> int:
        """Id written at image placeholder positions (the model overwrites their embeddings).

        The pad/EOS id: a real embedding row, never a target, never produced by `encode`, and
        not the mask id, so neither the objective nor the sampler mistakes a placeholder for a
        masked position.
        """
        return self._ids["eos"]

    @property
    def structural_ids(self) -> tuple[int, int, int, int]:
        """Tokens that are targets wherever they occur (DESIGN.md 2.1)."""
        return (self.bos_id, self.start_header_id, self.end_header_id, self.eot_id)


# ---------------------------------------------------------------------------------------------
# The demo tokenizer: a byte-level BPE trained here, deterministically, on a fixed corpus.


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def _pre_tokenizer():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_bpe(texts: Sequence[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over the pre-tokenized `texts`.

    Pure Python so that the result never depends on hash seeds or threads: the most frequent
    adjacent pair wins, ties go to the smallest pair in string order.
    """
    pre = _pre_tokenizer()
    counts: dict[str, int] = {}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            counts[piece] = counts.get(piece, 0) + 1
    words = [(list(w), c) for w, c in sorted(counts.items())]
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: dict[tuple[str, str], int] = {}
        for symbols, c in words:
            for pair in itertools.pairwise(symbols):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break  # every word is one token
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        merges.append(best)
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    symbols[i : i + 2] = [merged]
                i += 1
    return merges


def demo_corpus() -> list[str]:
    """The fixed training text: the synthetic data set's texts, the chat template's words."""
    # Imported here: template and synthetic import this module's types.
    from lladav_jax.data import synthetic, template

    texts = [template.DEFAULT_SYSTEM_PROMPT, "system", "user", "assistant", "\n\n", "\n"]
    texts += ["/think", "/no_think", "\n/think", "\n/no_think"]
    # A few short answers beyond the synthetic set (yes/no, digits, choice letters).
    texts += [f"\n\n{w}" for w in ("Yes", "No", "yes", "no", "A", "B", "C", "D")]
    texts += [f"\n\n{d}" for d in range(10)]
    texts += synthetic.corpus()
    return texts


def build_demo_tokenizer(vocab_limit: int = DEMO_VOCAB_LIMIT) -> Tokenizer:
    """A small tokenizer with LLaDA's special tokens, the same tokenizer.json bytes every call.

    Byte-level BPE: the 256 byte symbols cover any text; merges learned on `demo_corpus()` make
    every word of the synthetic data set a single token. Vocab <= `vocab_limit`, specials last.
    """
    alphabet = _byte_alphabet()
    num_merges = vocab_limit - len(alphabet) - len(SPECIAL_TOKENS)
    merges = train_bpe(demo_corpus(), num_merges)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    # `to_str` writes the vocab and added tokens in id order: the same bytes for the same merges.
    return Tokenizer(tok.to_str(pretty=True), source="<demo tokenizer>")
