"""The demo: the `tiny` model on the built-in synthetic data set, minutes on a laptop CPU.

    lladav-train --config configs/demo.py --workdir /tmp/lladav-demo
    lladav-train --config configs/demo.py --workdir /tmp/d --config.train.steps=20  # a smoke run

Ends with the held-out masked-answer accuracy (every answer token masked, one forward pass)
against chance, a loss curve in WORKDIR/loss.png and the rows of WORKDIR/metrics.jsonl.
"""

from lladav_jax.train.defaults import base_config


def get_config():
    c = base_config("tiny")
    c.data.size = 8192
    c.data.eval_size = 512
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.data.window = 256
    c.data.num_workers = 1
    c.optim.lr = dict(vision=3e-3, connector=3e-3, llm=3e-3)
    c.optim.warmup_ratio = 0.03
    c.train.log_every = 20
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 2
    return c
