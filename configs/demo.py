"""The demo: the `tiny` model on the built-in synthetic data set, minutes on a laptop CPU.

    lladav-train --config configs/demo.py --workdir /tmp/lladav-demo
    lladav-train --config configs/demo.py --workdir /tmp/d --config.train.steps=20  # a smoke run

Ends with the held-out masked-answer accuracy (every answer token masked, one forward pass)
against chance, a loss curve in WORKDIR/loss.png and the rows of WORKDIR/metrics.jsonl.
"""

from lladav_jax.train.defaults import demo


def get_config():
    return demo()
