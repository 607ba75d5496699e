"""LLaDA-V stage 2a (single-image SFT): MAmmoTH-VL 10M, AnyRes, everything trains.

    lladav-train --config configs/stage2a.py --workdir gs://BUCKET/runs/stage2a \\
        --config.init_from=gs://BUCKET/runs/stage1 --config.tokenizer=gs://BUCKET/runs/stage1 \\
        --config.data.source=array_record --config.data.path='/mnt/gcs/mammoth_si/*'

docs/design.md §9.1: lr vision 2e-6, rest 1e-5; global batch 256; max length 8192; bf16; gradient
checkpointing; cosine with 3% warmup; one epoch. The workdir, init_from and tokenizer are bucket
URLs, read and written directly; the ArrayRecord shards are read through the bucket mounted at
the same place on every host (launch/tpu.sh setup --bucket: gcsfuse at /mnt/gcs). Check the
mesh and memory first:

    lladav-plan --config configs/stage2a.py --topology v5p-64
"""

from lladav_jax.train.defaults import sft_8b


def get_config():
    return sft_8b()
