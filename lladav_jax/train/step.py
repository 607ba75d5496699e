"""The compiled train step: masked-diffusion loss, accumulated over micro-batches, one update.

Parameters are split in two nnx states: `trainable` (differentiated, updated, donated) and
`frozen` (read only). Loss sums and sample counts are accumulated separately and divided once,
so one device or many, one micro-batch or several, all give the same normalisation.
A step whose loss or gradient is not finite changes nothing and says so (`skipped`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lladav_jax.data.example import VISUAL_KEYS
from lladav_jax.diffusion import objective

# What `LLaDAV.__call__` takes.
MODEL_KEYS = ("tokens", "positions", "segment_ids", "turn_ids", *VISUAL_KEYS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    trainable: nnx.State
    opt_state: optax.OptState
    rng: jax.Array


def micro_loss(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State, batch: dict,
               rng: jax.Array, mask_id: int, complementary: bool = False,
               head_chunk: int = 0) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(loss sum, sample count, masked-token count) of one micro-batch. complementary:
    LaViDa's complementary masks (docs/design.md §4.4): every row runs twice, 2B rows, its two
    copies adjacent (under a batch-sharded mesh both stay on the row's device: no transfer);
    sums and sample counts add both copies. head_chunk > 0: the head runs only at the masked
    positions, that many at a time (`objective.head_loss_terms`); 0: at every position."""
    model = nnx.merge(graphdef, trainable, frozen)
    if complementary:
        noisy, masked, p_mask = objective.complementary_masks(
            rng, batch["tokens"], batch["targets"], batch["segment_ids"], mask_id
        )
        pairs = lambda x: jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:])  # [2, B, ..] -> [2B, ..]
        noisy, masked, p_mask = pairs(noisy), pairs(masked), pairs(p_mask)
        keys = [k for k in (*MODEL_KEYS, "targets") if k in batch]
        batch = {k: jnp.repeat(batch[k], 2, axis=0) for k in keys}  # [2B, ..], the same order
    else:
        noisy, masked, p_mask = objective.forward_mask(
            rng, batch["tokens"], batch["targets"], batch["segment_ids"], mask_id
        )
    inputs = {**{k: batch[k] for k in MODEL_KEYS if k in batch}, "tokens": noisy}
    # LoRA dropout's key (unused, and compiled away, without adapters or at rate 0).
    dropout_rng = jax.random.fold_in(rng, 1)
    terms = (batch["tokens"], masked, p_mask, batch["targets"], batch["segment_ids"])
    if head_chunk:
        hidden = model.hidden(**inputs, dropout_rng=dropout_rng)
        total, count = objective.head_loss_terms(hidden, model.llm.lm_head, *terms, head_chunk)
    else:
        total, count = objective.loss_terms(model(**inputs, dropout_rng=dropout_rng), *terms)
    return total, (count, jnp.sum(masked))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    mask_id: int, complementary: bool = False, head_chunk: int = 0) -> Callable:
    """step(state, frozen, batch) -> (state, metrics); batch arrays are [accum, micro, ...].
    complementary: LaViDa's complementary masking (train.complementary_masking); head_chunk:
    train.head_chunk (`micro_loss`)."""

    def step(state: TrainState, frozen: nnx.State, batch: dict):
        rng, step_rng = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(micro_loss, argnums=1, has_aux=True)

        def accumulate(carry, xs):
            micro, k = xs
            (total, (count, n_masked)), grads = grad_fn(
                graphdef, state.trainable, frozen, micro, k, mask_id, complementary, head_chunk
            )
            acc_grads, acc_total, acc_count, acc_masked = carry
            acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
            return (acc_grads, acc_total + total, acc_count + count, acc_masked + n_masked), None

        accum = jax.tree.leaves(batch)[0].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.int32(0))
        keys = jax.random.split(step_rng, accum)
        (grads, total, count, n_masked), _ = jax.lax.scan(accumulate, init, (batch, keys))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = total / count
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            trainable=keep(trainable, state.trainable),
            opt_state=keep(opt_state, state.opt_state),
            rng=rng,
        )
        metrics = dict(loss=loss, grad_norm=grad_norm, samples=count, masked_tokens=n_masked,
                       skipped=~ok)
        return new_state, metrics

    return step


def split_accum(batch: dict, accum: int) -> dict:
    """[accum * micro, ...] -> [accum, micro, ...] for every array of a batch."""
    return jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
