"""The tokenizer: a Hugging Face `tokenizer.json` read through `tokenizers`, nothing fetched.

`Tokenizer.load(path)` takes the official LLaDA tokenizer as-is; `data.demo_tokenizer` holds a
small byte-level BPE with the same special tokens for tests, the demo and the `tiny` model.
Special ids are always looked up by their text (DESIGN.md 1.1), never hard-coded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import tokenizers

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
