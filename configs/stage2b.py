"""LLaDA-V stage 2b (OneVision SFT): MAmmoTH-VL 2M multi-image/video, max length 16384.

    lladav-train --config configs/stage2b.py --workdir gs://BUCKET/runs/stage2b \\
        --config.init_from=gs://BUCKET/runs/stage2a --config.tokenizer=gs://BUCKET/runs/stage2a \\
        --config.data.path='/mnt/gcs/mammoth_ov/*'
"""

from lladav_jax.train.defaults import sft_8b


def get_config():
    c = sft_8b()
    c.data.seq_len = 16384
    c.model.image.max_tiles = 64  # several images per sample
    c.model.image.max_visual_tokens = 14580
    return c
