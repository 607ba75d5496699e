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

All of it is one jitted program: blocks in a while loop that ends once every row is done
(`shrink_batch`: finished rows leave the batch between blocks), steps in a while loop that ends
when the block is decoded or every row is done. Prompts are left-padded (padding is segment 0,
invisible) with positions counted from each prompt's first token, so a row decodes as it would
alone.
A prompt with `turn_ids` (a multi-turn conversation, for a model with the conversation mask)
gives the answer its last turn: it sees the whole dialogue, earlier turns never see it.

Caches (`cache_policy`): `none` runs the whole sequence every step. `prefix` runs it once per
block to cache every position's keys/values, then each step runs only the block and what follows
it. `dual` runs only the block, the suffix's keys/values cached too (Fast-dLLM's approximation).
`adaptive` runs only the block too, and refreshes the cache only when it has drifted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import io_callback

from lladav_jax.data.example import VISUAL_KEYS
from lladav_jax.diffusion.cache_policy import POLICIES, block_kv, drift
from lladav_jax.diffusion.options import SamplerOptions, SpecialIds
from lladav_jax.diffusion.unmasking import (
    end_last,
    fold_rows,
    gumbel_argmax,
    num_transfer_tokens,
    row_keys,
    rows_done,
    select,
    uniform_rows,
)


class _Setup(NamedTuple):
    """What every step shares: the options, the special ids, the prompt length, and the
    sequence's fixed inputs, row by row (B' rows: B, or 2B with CFG): the prompt's embeddings
    with its images [B', L, D] (the answer's part unused), positions, segment ids [B', L] and
    turn ids [B', L] or None."""

    options: SamplerOptions
    ids: SpecialIds
    prompt_len: int
    prompt_embeds: jax.Array
    positions: jax.Array
    segments: jax.Array
    turns: jax.Array | None

    @property
    def policy(self):
        return POLICIES[self.options.cache]

    def embeds(self, model, x: jax.Array) -> jax.Array:
        """Embeddings of the sequence x [B', L]: the prompt's as computed once, the answer's
        from its current tokens."""
        is_prompt = (jnp.arange(x.shape[1]) < self.prompt_len)[None, :, None]
        return jnp.where(is_prompt, self.prompt_embeds, model.llm.embed(x))


class _State(NamedTuple):
    x: jax.Array  # [B', L] the sequence
    cache: tuple[jax.Array, jax.Array] | None  # keys, values [layers, B', L, kv_heads, dim]
    committed_at: jax.Array  # [B, gen_length]
    step: jax.Array  # denoising steps so far
    done: jax.Array  # [B]
    refreshes: jax.Array  # full passes so far
    reference: jax.Array | None  # the block's keys/values at the last full pass (drift)


def _full_pass(model, s: _Setup, x, cache, start):
    """Logits [B', block, V] of the block at `start` from the whole sequence; with a cache,
    every position's keys/values are written into it."""
    llm, o = model.llm, s.options
    if cache is None:
        h = llm.hidden_states(s.embeds(model, x), s.positions, s.segments, turn_ids=s.turns)
    else:
        h, cache = llm.cached_hidden_states(s.embeds(model, x), s.positions, s.segments, cache, 0,
                                            s.segments, s.turns, s.turns)
    return llm.logits(jax.lax.dynamic_slice_in_dim(h, start, o.block_length, axis=1)), cache


def _cached_pass(model, s: _Setup, x, cache, start, back: int = 0):
    """Logits of the block at `start` from a pass over the policy's chunk only (the block, or
    the block and its suffix: `start` a Python int there), the rest read from the cache; the
    cache with the chunk's fresh keys/values written in is returned too. `back` > 0: the chunk
    starts that many positions earlier (the block before, `keeps_block`). Only the chunk is
    embedded: it lies after the prompt, so it holds no image."""
    llm, bl = model.llm, s.options.block_length
    size = bl + back if s.policy.chunk == "block" else x.shape[1] - start
    chunk = lambda a: jax.lax.dynamic_slice_in_dim(a, start - back, size, axis=1)
    h, cache = llm.cached_hidden_states(
        llm.embed(chunk(x)), chunk(s.positions), chunk(s.segments), cache, start - back,
        s.segments, None if s.turns is None else chunk(s.turns), s.turns)
    return llm.logits(h[:, back:back + bl]), cache


def _block_logits(model, s: _Setup, st: _State, start, first_in_block):
    """The block's logits by the policy's choice of pass; returns (logits, cache, full passes
    run, reference)."""
    pol, o = s.policy, s.options
    if not pol.cached:
        logits, _ = _full_pass(model, s, st.x, None, start)
        return logits, None, jnp.int32(1), None
    bl = o.block_length

    def full(cache):
        logits, cache = _full_pass(model, s, st.x, cache, start)
        ref = block_kv(cache, start, bl) if pol.measures_drift else None
        return logits, cache, jnp.int32(1), ref, jnp.float32(0)

    def cached(cache):
        if pol.keeps_block:  # a block's first step runs the block before it too: its last
            # commits were never run through the model, and no full pass may have followed
            after_one = first_in_block & (start > s.prompt_len)
            logits, fresh = jax.lax.cond(
                after_one, lambda c: _cached_pass(model, s, st.x, c, start, bl),
                lambda c: _cached_pass(model, s, st.x, c, start), cache)
        else:
            logits, fresh = _cached_pass(model, s, st.x, cache, start)
        d = (drift(block_kv(fresh, start, bl), st.reference, _live(s, st, start))
             if pol.measures_drift else jnp.float32(0))
        return logits, fresh if pol.keeps_block else cache, jnp.int32(0), st.reference, d

    before = pol.refresh_before(st.step == 0, first_in_block)
    logits, cache, n, ref, d = jax.lax.cond(before, full, cached, st.cache)
    if pol.measures_drift:  # a stale cache: the step again, by a full pass
        again = ~before & pol.refresh_after(d, o.refresh_threshold)
        keep = lambda _: (logits, cache, n, ref, d)
        logits, cache, n, ref, _ = jax.lax.cond(again, full, keep, st.cache)
    return logits, cache, n, ref


def _live(s: _Setup, st: _State, start) -> jax.Array:
    """[B', block]: the block's positions still masked in rows not done (CFG's unconditional
    rows with their conditional ones): where drift is measured."""
    masked = jax.lax.dynamic_slice_in_dim(st.x, start, s.options.block_length, axis=1)
    done = jnp.tile(st.done, st.x.shape[0] // st.done.shape[0])
    return (masked == s.ids.mask) & ~done[:, None]


def _step(model, s: _Setup, st: _State, b, quota, first_in_block, rng) -> _State:
    """One denoising step of block `b`."""
    o, ids = s.options, s.ids
    bl, start = o.block_length, s.prompt_len + b * o.block_length
    n = st.done.shape[0]
    logits, cache, full_passes, reference = _block_logits(model, s, st, start, first_in_block)
    logits = logits.astype(jnp.float32)
    if o.cfg_scale > 0:  # rows are [conditional; unconditional]
        cond, uncond = jnp.split(logits, 2)
        logits = uncond + (o.cfg_scale + 1.0) * (cond - uncond)
    logits = logits.at[..., jnp.array(ids.forbidden_for(o))].set(-jnp.inf)
    x = st.x
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
    commit = select(confidence, quota, o.threshold) & masked & ~st.done[:, None]
    xb = jnp.where(commit, x0, xb)
    at = jax.lax.dynamic_slice_in_dim(st.committed_at, b * bl, bl, axis=1)
    committed_at = jax.lax.dynamic_update_slice_in_dim(
        st.committed_at, jnp.where(commit, st.step, at), b * bl, axis=1)
    # The unconditional rows (CFG) get the same answer tokens: only their prompt is masked.
    xb = jnp.concatenate([xb, xb]) if o.cfg_scale > 0 else xb
    x = jax.lax.dynamic_update_slice_in_dim(x, xb, start, axis=1)
    done = st.done | rows_done(x[:n, s.prompt_len:], ids)
    return _State(x, cache, committed_at, st.step + 1, done, st.refreshes + full_passes,
                  reference)


def _decode_block(model, s: _Setup, st: _State, b, rng) -> _State:
    o, ids, pol = s.options, s.ids, s.policy
    spb = o.steps // o.num_blocks
    bl, start = o.block_length, s.prompt_len + b * o.block_length
    n = st.done.shape[0]
    masked_count = jnp.sum(jax.lax.dynamic_slice_in_dim(st.x[:n], start, bl, axis=1) == ids.mask,
                           axis=1)
    quotas = num_transfer_tokens(masked_count, spb)
    # With a threshold, steps continue until the block is decoded (at least one per step).
    limit = bl if o.threshold is not None else spb
    if pol.measures_drift:  # the block's keys/values as the last full pass left them
        st = st._replace(reference=block_kv(st.cache, start, bl))

    def block_left(st):
        xb = jax.lax.dynamic_slice_in_dim(st.x[:n], start, bl, axis=1)
        return jnp.any((xb == ids.mask) & ~st.done[:, None])

    def cond(carry):
        i, st = carry
        return (i < limit) & block_left(st)

    def body(carry):
        i, st = carry
        quota = quotas[:, jnp.minimum(i, spb - 1)]
        return i + 1, _step(model, s, st, b, quota, i == 0, fold_rows(rng, i))

    _, st = jax.lax.while_loop(cond, body, (jnp.int32(0), st))
    return st


def batch_sizes(rows: int) -> tuple[int, ...]:
    """The sizes a batch of `rows` shrinks through (`shrink_batch`), ascending: its halves,
    rounded up, down to 1."""
    sizes = [rows]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // 2))
    return tuple(sorted(set(sizes)))


def _on_live_rows(model, s: _Setup, st: _State, b, keys) -> _State:
    """`_decode_block` on the rows still decoding only: gathered, with as many finished rows
    as fill the smallest of `batch_sizes` that holds them, then scattered back."""
    rows = st.done.shape[0]
    sizes = batch_sizes(rows)
    order = jnp.argsort(st.done, stable=True)  # the rows still decoding first
    branch = jnp.searchsorted(jnp.asarray(sizes), jnp.sum(~st.done))

    def on(k: int) -> Callable:
        def run(st: _State) -> _State:
            if k == rows:
                return _decode_block(model, s, st, b, keys)
            idx = order[:k]
            take = lambda a, axis: None if a is None else jnp.take(a, idx, axis=axis)
            sub_s = s._replace(prompt_embeds=take(s.prompt_embeds, 0),
                               positions=take(s.positions, 0), segments=take(s.segments, 0),
                               turns=take(s.turns, 0))
            cache = None if st.cache is None else tuple(take(c, 1) for c in st.cache)
            sub = _State(take(st.x, 0), cache, take(st.committed_at, 0), st.step,
                         take(st.done, 0), st.refreshes, take(st.reference, 2))
            out = _decode_block(model, sub_s, sub, b, take(keys, 0))

            def put(full, part, axis):
                return None if full is None else full.at[(slice(None),) * axis + (idx,)].set(part)

            cache = None if st.cache is None else tuple(
                put(f, c, 1) for f, c in zip(st.cache, out.cache, strict=True))
            return _State(put(st.x, out.x, 0), cache, put(st.committed_at, out.committed_at, 0),
                          out.step, put(st.done, out.done, 0), out.refreshes,
                          put(st.reference, out.reference, 2))
        return run

    return jax.lax.switch(branch, [on(k) for k in sizes], st)


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
    [B, gen_length] (the step that committed each token; -1 never), `steps` (denoising
    steps run) and `refreshes` (full passes run). `on_block(b, tokens)` is called on the host
    after every block decoded. `rng`: one key, or one per row ([B]: `row_keys`).
    """
    o = options
    tokens, valid = prompt["tokens"], prompt["valid"].astype(bool)
    b, p = tokens.shape
    rng = row_keys(rng, b)
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
    s = _Setup(o, ids, p, prompt_embeds, positions, segments, turns)
    cache = (model.llm.init_cache(x.shape[0], x.shape[1], prompt_embeds.dtype)
             if s.policy.cached else None)
    # Its shape; `_decode_block` fills it at each block's start.
    reference = block_kv(cache, p, o.block_length) if s.policy.measures_drift else None
    state = _State(x, cache, jnp.full((b, o.gen_length), -1, jnp.int32), jnp.int32(0),
                   jnp.zeros((b,), bool), jnp.int32(0), reference)

    def run(blk, st):
        if o.shrink_batch and b > 1 and o.cfg_scale == 0:
            st = _on_live_rows(model, s, st, blk, fold_rows(rng, blk))
        else:
            st = _decode_block(model, s, st, blk, fold_rows(rng, blk))
        if on_block is not None:
            io_callback(on_block, None, blk, st.x[:b, p:], ordered=True)
        return st

    if o.cache == "prefix":  # the chunk shrinks block by block: unrolled, static shapes
        for blk in range(o.num_blocks):
            state = run(blk, state)
    else:  # blocks until every row is done
        _, state = jax.lax.while_loop(
            lambda c: (c[0] < o.num_blocks) & ~jnp.all(c[1].done),
            lambda c: (c[0] + 1, run(c[0], c[1])), (jnp.int32(0), state))
    return {"tokens": state.x[:b, p:], "committed_at": state.committed_at, "steps": state.step,
            "refreshes": state.refreshes}


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
