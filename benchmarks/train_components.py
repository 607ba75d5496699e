"""Where a train step's time goes: one text layer's attention and the head + cross-entropy,
each forward and backward, ours against PyTorch's; `benchmarks/train_step.py --components`
runs it (not a command of its own). Also the step timer both use.
"""

from __future__ import annotations

import gc
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.models.attention import attention


def timed(step) -> dict:
    """One step: wall seconds, process CPU seconds (all threads) and the 1-minute load."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return dict(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
                load=os.getloadavg()[0])


def components(cfg, rows: int, seq_len: int, repeats: int = 3) -> None:
    """Where the difference comes from: one text layer's attention, forward + backward, and
    the head + cross-entropy, ours (jitted; attention xla and chunked) against torch's, best of
    `repeats`."""
    t = cfg.text
    b, n, h, d, dim, vocab = rows, seq_len, t.num_heads, t.head_dim, t.hidden_size, t.vocab_size

    def best(run) -> tuple[float, float]:
        run()
        ts = [timed(run) for _ in range(repeats)]
        return min(x["wall"] for x in ts), min(x["cpu"] for x in ts)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, n, h, d), np.float32)
    seg = jnp.ones((b, n), jnp.int32)
    grads = {impl: jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(
        attention(q, k, v, q_segment_ids=seg, impl=impl) ** 2), argnums=(0, 1, 2)))
        for impl in ("xla", "chunked")}
    xj = jnp.asarray(x)
    xt = torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).requires_grad_()
    mask = ref.bidirectional_mask(np.ones((b, n), np.int32))

    def sdpa():
        out = torch.nn.functional.scaled_dot_product_attention(xt, xt, xt, attn_mask=mask)
        (out**2).sum().backward()

    def eager():  # transformers' eager_attention_forward
        p = torch.softmax(xt @ xt.transpose(-1, -2) * d**-0.5 + mask, -1, dtype=torch.float32)
        ((p @ xt) ** 2).sum().backward()

    attn_flops = 3 * 4 * b * h * n * n * d
    rows_out = {
        **{f"attention fwd+bwd, ours ({impl})": best(
            lambda g=g: jax.block_until_ready(g(xj, xj, xj))) for impl, g in grads.items()},
        "attention fwd+bwd, torch sdpa": best(sdpa),
        "attention fwd+bwd, torch eager": best(eager),
    }
    hidden = rng.standard_normal((b, n, dim), np.float32)
    w = 0.02 * rng.standard_normal((dim, vocab), np.float32)
    tok = rng.integers(0, vocab, (b, n))

    def ce(hh, ww):
        logp = jax.nn.log_softmax(hh @ ww, -1)
        return -jnp.sum(jnp.take_along_axis(logp, jnp.asarray(tok)[..., None], -1))

    head = jax.jit(jax.grad(ce, argnums=(0, 1)))
    ht, wt = torch.from_numpy(hidden).requires_grad_(), torch.from_numpy(w).requires_grad_()
    tt = torch.from_numpy(tok)

    def head_torch():
        logp = torch.log_softmax(ht @ wt, -1)
        (-logp.gather(-1, tt[..., None]).sum()).backward()

    head_flops = 6 * b * n * dim * vocab
    hj, wj = jnp.asarray(hidden), jnp.asarray(w)
    rows_out["head + CE fwd+bwd, ours"] = best(lambda: jax.block_until_ready(head(hj, wj)))
    rows_out["head + CE fwd+bwd, torch"] = best(head_torch)
    print(f"\ncomponents ({b} x {n} tokens, {h} heads of {d}; attention runs {t.num_layers} "
          f"times a step), best of {repeats}:")
    for name, (wall, cpu) in rows_out.items():
        f = attn_flops if name.startswith("attention") else head_flops
        print(f"  {name:32s} {wall * 1e3:8.1f} ms wall {cpu * 1e3:8.1f} ms CPU "
              f"({f / cpu / 1e9:5.1f} GFLOP per CPU-second)", flush=True)
