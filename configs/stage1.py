"""LLaDA-V stage 1 (alignment): LLaVA-Pretrain 558K, plain template, only the connector trains.

    lladav-convert import-hf --llm LLaDA-8B-Instruct --vision siglip2-so400m-patch14-384 \\
        --out gs://BUCKET/lladav-init
    lladav-train --config configs/stage1.py --workdir gs://BUCKET/runs/stage1 \\
        --config.init_from=gs://BUCKET/lladav-init \\
        --config.tokenizer=gs://BUCKET/lladav-init/tokenizer.json \\
        --config.data.path=blip_laion_cc_sbu_558k.json --config.data.image_folder=images/

docs/design.md §9.1: AdamW (weight decay 0), cosine with 3% warmup, lr 1e-3, global batch 64,
max length 8192, bf16, gradient checkpointing, one epoch.
"""

from lladav_jax.train.defaults import base_config


def get_config():
    c = base_config("8b")
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.model.image.aspect_ratio = "plain"
    c.model.image.max_tiles = 1
    c.model.image.max_visual_tokens = 729
    c.data.source = "llava_json"
    c.data.template = "plain"
    c.data.seq_len = 8192
    c.data.batch_size = 64
    c.data.window = 1024
    c.data.pack = True  # short captions: packing keeps 8192-token rows full
    c.data.num_workers = 8
    c.optim.lr = dict(vision=0.0, connector=1e-3, llm=0.0)
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    return c
