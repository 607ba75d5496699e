"""The LLaDA sampler (docs/design.md §5.1) with Fast-dLLM's caches and parallel decoding (§5.2-5.3).

The answer region (gen_length mask tokens after the prompt) is decoded in blocks, left to
right; each block gets steps / num_blocks steps. A step predicts every masked position of the
block (argmax, with Gumbel noise when temperature > 0), scores it (its probability for
`low_confidence`, a uniform draw for `random`) and commits the most confident ones: k per step,
the block's masked count split evenly over its steps (remainder first), or, with a `threshold`,
every position above it and at least one. LLaDA-V forbids EOS, BOS and the header tokens at
masked positions, and a row is done once `<|eot_id|>` is committed with nothing masked before it;
`allow_eos` lets a model trained with EOS padding (docs/design.md §4.5) fill its window with
EOS, which ends the answer like `<|eot_id|>`.

All of it is one jitted program: blocks in a loop, steps in a while loop that ends when the
block is decoded or every row is done. Prompts are left-padded (padding is segment 0, invisible)
with positions counted from each prompt's first token, so a row decodes as it would alone.
A prompt with `turn_ids` (a multi-turn conversation, for a model with the conversation mask)
gives the answer its last turn: it sees the whole dialogue, earlier turns never see it.

Caches: `none` runs the whole sequence every step. `prefix` runs it once per block to cache
every position's keys/values, then each step runs only the block and what follows it. `dual`
runs only the block, the suffix's keys/values cached too (Fast-dLLM's approximation).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import io_callback

from lladav_jax.data.example import VISUAL_KEYS

CACHES = ("none", "prefix", "dual")
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
        if self.remasking not in REMASKING:
            raise bad("remasking", f"choose one of {', '.join(REMASKING)}")
        if self.cache not in CACHES:
            raise bad("cache", f"choose one of {', '.join(CACHES)}")
        if not isinstance(self.allow_eos, bool):
            raise bad("allow_eos", "must be True or False")

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


def num_transfer_tokens(masked_count: jax.Array, steps: int) -> jax.Array:
    """[B] masked positions of a block -> [B, steps] commits per step, remainder first."""
    base, rem = masked_count // steps, masked_count % steps
    return base[:, None] + (jnp.arange(steps)[None] < rem[:, None]).astype(jnp.int32)


def row_keys(rng: jax.Array, rows: int) -> jax.Array:
    """[rows] random keys: `rng` itself if it is one key per row already, else one key folded
    with each row's index. Every draw of a row comes from its own key, so a row samples the
    same whatever else is in its batch (the server's batches, `Model.generate_batch`)."""
    if rng.ndim:
        if rng.shape != (rows,):
            raise ValueError(f"rng: one key or {rows} (one per row), got shape {rng.shape}")
        return rng
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(rows))


def fold_rows(keys: jax.Array, data) -> jax.Array:
    """Each row's key folded with the same `data` (a block or step index)."""
    return jax.vmap(jax.random.fold_in, (0, None))(keys, data)


def uniform_rows(keys: jax.Array, shape: tuple[int, ...], minval: float = 0.0) -> jax.Array:
    """[rows, *shape] uniform draws in [minval, 1), row i from keys[i]."""
    return jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, minval=minval))(keys)


def gumbel_argmax(logits: jax.Array, temperature: float, rng: jax.Array) -> jax.Array:
    """LLaDA's sampling: argmax of exp(logits) / (-log u)^T (plain argmax at T = 0); logits
    [B, ...], rng one key per row [B]."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    u = uniform_rows(rng, logits.shape[1:], minval=1e-20)
    # Same argmax as exp(l) / g^T, in log space: no overflow in float32.
    return jnp.argmax(logits - temperature * jnp.log(-jnp.log(u)), axis=-1)


def select(confidence: jax.Array, k: jax.Array, threshold: float | None) -> jax.Array:
    """Which positions to commit: the k most confident per row (k [B]); with a threshold,
    the most confident one and every other above it. -inf never commits."""
    order = jnp.argsort(-confidence, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    finite = confidence > -jnp.inf
    if threshold is None:
        return finite & (rank < k[:, None])
    return finite & ((rank == 0) | (confidence >= threshold))


def rows_done(gen: jax.Array, ids: SpecialIds) -> jax.Array:
    """[B]: an <|eot_id|> or EOS was committed and nothing before the first one is still
    masked (EOS is only ever committed where `allow_eos` lets it)."""
    is_end = (gen == ids.eot) | (gen == ids.eos)
    first = jnp.argmax(is_end, axis=-1)
    before = jnp.arange(gen.shape[1])[None] < first[:, None]
    return jnp.any(is_end, axis=-1) & ~jnp.any(before & (gen == ids.mask), axis=-1)


def end_last(confidence: jax.Array, x0: jax.Array, masked: jax.Array,
             ids: SpecialIds) -> jax.Array:
    """Under `allow_eos`: a position whose prediction is an end token (EOS, <|eot_id|>) with a
    masked position before it in the block ranks below every other (confidence - 1, scores
    being in [0, 1]), so the answer's length is settled after its content, where it ends. The
    first masked position is never held back, so every step commits as many as it would.

    Why: by confidence alone the far EOS go first, then the EOS right after the answer, whose
    confidence is the model's belief in a short answer; the words were then chosen to fit
    (BENCHMARKS.md, "Answer length")."""
    is_end = (x0 == ids.eot) | (x0 == ids.eos)
    pending = jnp.cumsum(masked, axis=-1) - masked > 0
    return jnp.where(is_end & pending, confidence - 1.0, confidence)


@dataclasses.dataclass(frozen=True)
class _Setup:
    options: SamplerOptions
    ids: SpecialIds
    prompt_len: int


def _block_logits(model, s: _Setup, embeds, positions, segments, turns, cache, b, x,
                  fresh: bool):
    """Logits [B, block, V] of block `b`: by a full pass (no cache, or a block's first step,
    which also fills the cache) or by a cached pass over the block (dual) or block + suffix
    (prefix; `b` is a Python int there). `turns`: turn ids [B, L], or None."""
    o, p = s.options, s.prompt_len
    bl = o.block_length
    start = p + b * bl
    llm = model.llm
    if o.cache == "none" or fresh:
        if o.cache == "none":
            h = llm.hidden_states(embeds(x), positions, segments, turn_ids=turns)
        else:
            h, cache = llm.cached_hidden_states(embeds(x), positions, segments, cache, 0,
                                                segments, turns, turns)
        return llm.logits(jax.lax.dynamic_slice_in_dim(h, start, bl, axis=1)), cache
    size = bl if o.cache == "dual" else x.shape[1] - start
    chunk = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)
    h, _ = llm.cached_hidden_states(chunk(embeds(x)), chunk(positions), chunk(segments), cache,
                                    start, segments, None if turns is None else chunk(turns),
                                    turns)
    return llm.logits(h[:, :bl]), cache


def _step(model, s: _Setup, embeds, positions, segments, turns, state, b, quota, fresh, rng):
    """One denoising step of block `b`; state = (x, cache, committed_at, step, done)."""
    o, ids = s.options, s.ids
    x, cache, committed_at, step, done = state
    bl, start = o.block_length, s.prompt_len + b * o.block_length
    logits, cache = _block_logits(model, s, embeds, positions, segments, turns, cache, b, x,
                                  fresh)
    logits = logits.astype(jnp.float32)
    if o.cfg_scale > 0:  # rows are [conditional; unconditional]
        cond, uncond = jnp.split(logits, 2)
        logits = uncond + (o.cfg_scale + 1.0) * (cond - uncond)
    logits = logits.at[..., jnp.array(ids.forbidden_for(o))].set(-jnp.inf)
    n = logits.shape[0]
    xb = jax.lax.dynamic_slice_in_dim(x[:n], start, bl, axis=1)
    masked = xb == ids.mask
    noise_rng, rank_rng = fold_rows(rng, 0), fold_rows(rng, 1)
    x0 = gumbel_argmax(logits, o.temperature, noise_rng)
    if o.remasking == "low_confidence":
        probs = jax.nn.softmax(logits, axis=-1)
        score = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    else:
        score = uniform_rows(rank_rng, x0.shape[1:])
    confidence = jnp.where(masked, score, -jnp.inf)
    if o.allow_eos:  # an end token waits until nothing before it is masked (end_last)
        confidence = end_last(confidence, x0, masked, ids)
    commit = select(confidence, quota, o.threshold) & masked & ~done[:, None]
    xb = jnp.where(commit, x0, xb)
    at = jax.lax.dynamic_slice_in_dim(committed_at, b * bl, bl, axis=1)
    committed_at = jax.lax.dynamic_update_slice_in_dim(
        committed_at, jnp.where(commit, step, at), b * bl, axis=1)
    # The unconditional rows (CFG) get the same answer tokens: only their prompt is masked.
    xb = jnp.concatenate([xb, xb]) if o.cfg_scale > 0 else xb
    x = jax.lax.dynamic_update_slice_in_dim(x, xb, start, axis=1)
    done = done | rows_done(x[:n, s.prompt_len:], ids)
    return x, cache, committed_at, step + 1, done


def _decode_block(model, s, embeds, positions, segments, turns, state, b, rng):
    o, ids = s.options, s.ids
    spb = o.steps // o.num_blocks
    bl, start = o.block_length, s.prompt_len + b * o.block_length
    x = state[0]
    n = state[4].shape[0]
    masked_count = jnp.sum(jax.lax.dynamic_slice_in_dim(x[:n], start, bl, axis=1) == ids.mask,
                           axis=1)
    quotas = num_transfer_tokens(masked_count, spb)
    # With a threshold, steps continue until the block is decoded (at least one per step).
    limit = bl if o.threshold is not None else spb

    def block_left(st):
        xb = jax.lax.dynamic_slice_in_dim(st[0][:n], start, bl, axis=1)
        return jnp.any((xb == ids.mask) & ~st[4][:, None])

    def cond(carry):
        i, st = carry
        return (i < limit) & block_left(st)

    def body(carry):
        i, st = carry
        quota = quotas[:, jnp.minimum(i, spb - 1)]
        fresh = i == 0
        k = fold_rows(rng, i)
        if o.cache == "none":
            st = _step(model, s, embeds, positions, segments, turns, st, b, quota, False, k)
        else:  # the block's first step refreshes the cache with a full pass
            run = lambda t, full: _step(model, s, embeds, positions, segments, turns, t, b,
                                        quota, full, k)
            st = jax.lax.cond(fresh, lambda t: run(t, True), lambda t: run(t, False), st)
        return i + 1, st

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state


def generate(
    model,
    prompt: dict,
    options: SamplerOptions,
    ids: SpecialIds,
    rng: jax.Array,
    on_block: Callable | None = None,
) -> dict:
    """Answers for a batch of prompts; jit it (`jax.jit(generate, static_argnames=...)`).

    prompt: `tokens` [B, P] (left-padded), `valid` [B, P] bool, and optionally the visual
    inputs of `LLaDAV.embed_inputs` (`VISUAL_KEYS`, or `features` in place of `pixels`;
    `visual_pos` within the prompt) and
    `turn_ids` [B, P] (left padding 0; the answer takes each row's last turn).
    Returns `tokens` [B, gen_length] (masks left where a row stopped early), `committed_at`
    [B, gen_length] (the step that committed each token; -1 never) and `steps` (denoising
    steps run). `on_block(b, tokens)` is called on the host after every block. `rng`: one
    key, or one per row ([B]: `row_keys`).
    """
    o = options
    tokens, valid = prompt["tokens"], prompt["valid"].astype(bool)
    b, p = tokens.shape
    rng = row_keys(rng, b)
    s = _Setup(o, ids, p)
    x = jnp.concatenate([tokens, jnp.full((b, o.gen_length), ids.mask, tokens.dtype)], axis=1)
    segments = jnp.concatenate([valid, jnp.ones((b, o.gen_length), bool)], 1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    turns = answer_turns(prompt["turn_ids"], o.gen_length) if "turn_ids" in prompt else None
    visual = {k: prompt[k] for k in (*VISUAL_KEYS, "features") if k in prompt}
    prompt_embeds = model.embed_inputs(x, **visual)  # the vision tower runs once, if at all
    if o.cfg_scale > 0:  # the unconditional rows: the prompt (images too) all masks
        blank = jnp.where(segments[:, :p] > 0, ids.mask, tokens)
        uncond = model.llm.embed(jnp.concatenate([blank, x[:, p:]], axis=1))
        prompt_embeds = jnp.concatenate([prompt_embeds, uncond])
        x, segments, positions = (jnp.concatenate([a, a]) for a in (x, segments, positions))
        turns = None if turns is None else jnp.concatenate([turns, turns])
    is_prompt = (jnp.arange(x.shape[1]) < p)[None, :, None]

    def embeds(xs):
        return jnp.where(is_prompt, prompt_embeds, model.llm.embed(xs))

    cache = None if o.cache == "none" else model.llm.init_cache(x.shape[0], x.shape[1],
                                                                prompt_embeds.dtype)
    committed_at = jnp.full((b, o.gen_length), -1, jnp.int32)
    state = (x, cache, committed_at, jnp.int32(0), jnp.zeros((b,), bool))

    def run(blk, st):
        st = _decode_block(model, s, embeds, positions, segments, turns, st, blk,
                           fold_rows(rng, blk))
        if on_block is not None:
            io_callback(on_block, None, blk, st[0][:b, p:], ordered=True)
        return st

    if o.cache == "prefix":  # the chunk shrinks block by block: unrolled, static shapes
        for blk in range(o.num_blocks):
            state = run(blk, state)
    else:
        state = jax.lax.fori_loop(0, o.num_blocks, run, state)
    x, _, committed_at, steps, _ = state
    return {"tokens": x[:b, p:], "committed_at": committed_at, "steps": steps}


def answer_turns(prompt_turns: jax.Array, gen_length: int) -> jax.Array:
    """Turn ids [B, P] of left-padded prompts -> [B, P + gen_length]: the answer belongs to
    each row's last prompt turn (its last column: the padding is on the left)."""
    prompt_turns = jnp.asarray(prompt_turns, jnp.int32)
    last = prompt_turns[:, -1:]
    answer = jnp.broadcast_to(last, (prompt_turns.shape[0], gen_length))
    return jnp.concatenate([prompt_turns, answer], axis=1)


def jit_generate(graphdef, options: SamplerOptions, ids: SpecialIds,
                 on_block: Callable | None = None) -> Callable:
    """The jitted `state, prompt, rng -> result` of a model's graphdef (`lladav-plan` lowers
    it from abstract state)."""

    @jax.jit
    def run(state, prompt, rng):
        return generate(nnx.merge(graphdef, state), prompt, options, ids, rng, on_block)

    return run


def compiled_generate(model, options: SamplerOptions, ids: SpecialIds,
                      on_block: Callable | None = None) -> Callable:
    """A jitted `prompt, rng -> result` for one model and one set of options."""
    graphdef, state = nnx.split(model)
    run = jit_generate(graphdef, options, ids, on_block)
    return lambda prompt, rng: run(state, prompt, rng)
