"""The tokenizer: a Hugging Face `tokenizer.json` read through `tokenizers`, nothing fetched.

`Tokenizer.load(path)` takes the official LLaDA tokenizer as-is; `data.demo_tokenizer` holds a
small byte-level BPE with the same special tokens for tests, the demo and the `tiny` model.
Special ids are always looked up by their text (docs/design.md §1.2), never hard-coded.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable, Mapping

import tokenizers

from lladav_jax import paths

# name -> token text (docs/design.md §1.2). `<|endoftext|>` is also the pad token.
SPECIAL_TOKENS = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
    "mask": "<|mdm_mask|>",
}
# Those that are targets wherever they occur (`Tokenizer.structural_ids`).
STRUCTURAL = ("bos", "start_header", "end_header", "eot")
FILENAME = "tokenizer.json"


class _SpecialId:
    """`tok.NAME_id`: the id of SPECIAL_TOKENS[NAME] (another name when given, for an alias)."""

    def __init__(self, name: str | None = None):
        self.name = name

    def __set_name__(self, owner, attr: str) -> None:
        self.name = self.name or attr.removesuffix("_id")
        if self.name not in SPECIAL_TOKENS:
            raise TypeError(f"{owner.__name__}.{attr}: {self.name!r} is not in SPECIAL_TOKENS")

    def __get__(self, tok, owner=None) -> int:
        return self if tok is None else tok.special_ids[self.name]


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
        self._ids = types.MappingProxyType(ids)
        vocab = tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1

    # -- construction and persistence ---------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a directory holding `tokenizer.json`, or from the file itself (local or a
        bucket URL, `lladav_jax.paths`)."""
        path = paths.as_path(path)
        file = path / FILENAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        return cls(file.read_bytes().decode("utf-8"), source=os.fspath(file))

    def save(self, directory: str | os.PathLike) -> str:
        """Writes `tokenizer.json` (the loaded text, unchanged) into `directory`; returns it."""
        directory = paths.as_path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths.write_whole(directory / FILENAME, self._json)  # never half a tokenizer
        return os.fspath(directory / FILENAME)

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
    def special_ids(self) -> Mapping[str, int]:
        """Every special token's id by its name in SPECIAL_TOKENS (read only)."""
        return self._ids

    mask_id = _SpecialId()
    bos_id = _SpecialId()
    eos_id = _SpecialId()
    pad_id = _SpecialId("eos")
    start_header_id = _SpecialId()
    end_header_id = _SpecialId()
    eot_id = _SpecialId()

    @property
    def placeholder_id(self) -> int:
        """Id written at image placeholder positions (the model overwrites their embeddings).

        The pad/EOS id: a real embedding row, never a target, never produced by `encode`, and
        not the mask id, so neither the objective nor the sampler mistakes a placeholder for a
        masked position.
        """
        return self._ids["eos"]

    @property
    def structural_ids(self) -> tuple[int, ...]:
        """Tokens that are targets wherever they occur (docs/design.md §3.1)."""
        return tuple(self._ids[name] for name in STRUCTURAL)


# ---------------------------------------------------------------------------------------------
