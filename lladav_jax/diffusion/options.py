"""The sampler's options (`SamplerOptions`: one definition for the API, the CLIs, the server and
the PyTorch reference) and the special token ids it treats apart (`SpecialIds`)."""

from __future__ import annotations

import dataclasses
import numbers

# The cache policies by name (`cache_policy.POLICIES` holds one for each; a test keeps the two
# the same). Spelt out so that this module needs no JAX: the CLIs check their flags with it
# before JAX is imported.
CACHES = ("none", "prefix", "dual", "adaptive")
REMASKING = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """The sampler's options and their defaults: the one definition that `Model.generate`,
    the CLIs' flags and `torch_reference.generate` take theirs from (`defaults()`)."""

    gen_length: int = 128
    steps: int = 128
    block_length: int = 128
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    cache: str = "none"
    threshold: float | None = None
    # False: LLaDA-V's rule, EOS never predicted at a masked position. True: for a model
    # trained with EOS after its answers (`data.answer_window`): EOS may fill the window, and
    # a row's answer ends at its first EOS or <|eot_id|>.
    allow_eos: bool = False
    # cache="adaptive": a cached step whose drift (`cache_policy.drift`, 0 = the cache is
    # exact) reaches this is redone as a full pass that refreshes the cache.
    refresh_threshold: float = 0.05
    # Between blocks, rows that are done leave the batch: the next block runs on the rows
    # still decoding, gathered into the smallest of the batch sizes B, B/2, B/4, ..., 1 that
    # holds them (a block program compiled for each: more compile time). Not with CFG.
    shrink_batch: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):  # e.g. temperature=1 stored as 1.0
            value = getattr(self, f.name)
            if "float" in str(f.type) and value is not None:
                if not isinstance(value, numbers.Real) or isinstance(value, bool):
                    raise ValueError(f"sampler option {f.name}={value!r}: must be a number")
                object.__setattr__(self, f.name, float(value))
        self.check()

    def check(self) -> None:
        """ValueError naming the first option out of range, and the range: every rule the
        sampler assumes, checked before anything is compiled or allocated."""
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"sampler option {name}={getattr(self, name)!r}: {rule}")

        for name in ("gen_length", "steps", "block_length"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise bad(name, "must be an integer >= 1")
            if value < 1:
                raise bad(name, "must be >= 1")
        if self.gen_length % self.block_length:
            raise bad("gen_length", f"must be a multiple of block_length {self.block_length} "
                      "(the answer is decoded in whole blocks)")
        if self.steps % self.num_blocks:
            raise bad("steps", f"must be a multiple of the number of blocks, gen_length / "
                      f"block_length = {self.num_blocks} (every block gets the same steps)")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0: no noise, plain argmax)")
        if self.cfg_scale < 0:
            raise bad("cfg_scale", "must be >= 0 (0: no guidance)")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise bad("threshold", "must be a probability in (0, 1], or None (no parallel "
                      "decoding)")
        if self.refresh_threshold < 0:
            raise bad("refresh_threshold", "must be >= 0 (0: refresh at every step)")
        if self.remasking not in REMASKING:
            raise bad("remasking", f"choose one of {', '.join(REMASKING)}")
        if self.cache not in CACHES:
            raise bad("cache", f"choose one of {', '.join(CACHES)}")
        for name in ("allow_eos", "shrink_batch"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @classmethod
    def defaults(cls) -> dict:
        """Every option's name and default value, in field order."""
        return {f.name: f.default for f in dataclasses.fields(cls)}


# The special tokens (names of `tokenizer.SPECIAL_TOKENS`) LLaDA-V never predicts at a masked
# position.
FORBIDDEN = ("eos", "bos", "start_header", "end_header")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    mask: int
    eot: int
    forbidden: tuple[int, ...]  # never predicted at a masked position
    eos: int = -1  # ends an answer too; forbidden unless `allow_eos`

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        ids = tok.special_ids
        return cls(ids["mask"], ids["eot"], tuple(ids[name] for name in FORBIDDEN), ids["eos"])

    def forbidden_for(self, options: SamplerOptions) -> tuple[int, ...]:
        if options.allow_eos:
            return tuple(i for i in self.forbidden if i != self.eos)
        return self.forbidden
