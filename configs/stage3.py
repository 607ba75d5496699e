"""LLaDA-V stage 3 (reasoning): VisualWebInstruct, then a mix with /think and /no_think.

    lladav-train --config configs/stage3.py --workdir gs://BUCKET/runs/stage3 \\
        --config.init_from=gs://BUCKET/runs/stage2b --config.tokenizer=gs://BUCKET/runs/stage2b \\
        --config.data.mixture='[
            {"source": "array_record", "path": "/mnt/gcs/vwi/*", "weight": 0.3},
            {"source": "array_record", "path": "/mnt/gcs/mix/*", "weight": 0.7}]'
"""

from lladav_jax.train.defaults import sft_8b


def get_config():
    c = sft_8b()
    c.data.source = "mixture"
    c.data.seq_len = 16384
    return c
