"""LLaDA-V stage 2a (single-image SFT): MAmmoTH-VL 10M, AnyRes, everything trains.

    lladav-train --config configs/stage2a.py --workdir gs://bucket/stage2a \\
        --config.init_from=gs://bucket/stage1 --config.tokenizer=gs://bucket/stage1 \\
        --config.data.source=array_record --config.data.path='gs://bucket/mammoth_si/*'

DESIGN.md 2.3: lr vision 2e-6, rest 1e-5; global batch 256; max length 8192; bf16; gradient
checkpointing; cosine with 3% warmup; one epoch. `lladav-plan` checks the mesh fits first.
"""

from lladav_jax.train.defaults import sft_8b


def get_config():
    return sft_8b()
