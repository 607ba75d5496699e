"""Attention memory per layer and row: `xla` (the [H, L, L] scores materialised) against
`chunked` (blockwise, recomputing backward), from XLA's buffer assignment of the compiled
forward + backward pass; nothing runs, so the 8b shapes at 16,384 tokens compile on a laptop.

    python benchmarks/attention_memory.py [--lengths 2048 8192 16384] [--heads 32]
        [--kv_heads 32] [--head_dim 128] [--dtype bfloat16]

One row of `length` tokens, packed-segment ids (the trainer's batches carry them), the loss
sum(attention(q, k, v)) differentiated with respect to q, k and v. "temp" is the compiled
program's scratch memory (what the scores and their gradient cost); the inputs, outputs and
gradients themselves (4 x L x H x D) are the same for both and reported once.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

from lladav_jax.models import attention as attn

GIB = 2**30


def temp_bytes(impl: str, length: int, heads: int, kv_heads: int, head_dim: int,
               dtype: str) -> int:
    q = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct((1, length, kv_heads, head_dim), jnp.dtype(dtype))
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(q, k, v, s):
        return jnp.sum(attn.attention(q, k, v, q_segment_ids=s, impl=impl).astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=32)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    a = parser.parse_args()
    print(f"{jax.default_backend()}, {a.heads} heads ({a.kv_heads} kv) x {a.head_dim}, "
          f"{a.dtype}, one row, forward + backward")
    print("| tokens | xla temp | chunked temp | ratio | q, k, v + grads |")
    print("|---|---|---|---|---|")
    for length in a.lengths:
        xla, chunked = (temp_bytes(impl, length, a.heads, a.kv_heads, a.head_dim, a.dtype)
                        for impl in ("xla", "chunked"))
        io = 2 * length * (a.heads + 2 * a.kv_heads) * a.head_dim * jnp.dtype(a.dtype).itemsize
        print(f"| {length:,} | {xla / GIB:.2f} GiB | {chunked / GIB:.3f} GiB | "
              f"{xla / max(chunked, 1):.0f}x | {io / GIB:.3f} GiB |", flush=True)


if __name__ == "__main__":
    main()
