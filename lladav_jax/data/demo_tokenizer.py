"""The demo tokenizer: a byte-level BPE with LLaDA's special tokens, for tests, the demo and
the `tiny` model.

It ships with the package (`demo_tokenizer.json`): `load_demo_tokenizer()` reads it. The file is
made by `train_demo_tokenizer()` (pure Python, deterministic: the same bytes every time), and a
test checks that training it again gives the same file. To rebuild it after a change to the
synthetic data set's words or the chat template:

    python -m lladav_jax.data.demo_tokenizer
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Sequence

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers

from lladav_jax.data import synthetic, template
from lladav_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer

SHIPPED = pathlib.Path(__file__).with_name("demo_tokenizer.json")
# LLaMA-3 style pre-tokenization (newline runs stay together, so "\n\n" is one piece).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEMO_VOCAB_LIMIT = 2048  # the `tiny` model's vocab_size, specials included


def load_demo_tokenizer() -> Tokenizer:
    """The shipped demo tokenizer."""
    return Tokenizer(SHIPPED.read_text(encoding="utf-8"), source="<demo tokenizer>")


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
    texts = [template.DEFAULT_SYSTEM_PROMPT, "system", "user", "assistant", "\n\n", "\n"]
    texts += ["/think", "/no_think", "\n/think", "\n/no_think"]
    # A few short answers beyond the synthetic set (yes/no, digits, choice letters).
    texts += [f"\n\n{w}" for w in ("Yes", "No", "yes", "no", "A", "B", "C", "D")]
    texts += [f"\n\n{d}" for d in range(10)]
    texts += synthetic.corpus()
    return texts


def train_demo_tokenizer(vocab_limit: int = DEMO_VOCAB_LIMIT) -> Tokenizer:
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


if __name__ == "__main__":
    SHIPPED.write_text(train_demo_tokenizer().to_json(), encoding="utf-8")
    print(f"wrote {SHIPPED}")
