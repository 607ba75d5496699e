"""LoRA fine-tuning of the 8b model on your own LLaVA JSON, on one chip.

    lladav-convert import-hf --hf_dir LLaDA-V --out /ckpt/lladav-8b --param_dtype bfloat16
    lladav-plan --config configs/lora.py --topology v5e-1      # what fits, before a run
    lladav-train --config configs/lora.py --workdir /ckpt/my-lora \\
        --config.init_from=/ckpt/lladav-8b --config.tokenizer=/ckpt/lladav-8b \\
        --config.data.path=train.json --config.data.image_folder=images
    lladav-convert export-hf --ckpt /ckpt/my-lora --out /ckpt/my-lora-hf     # merged model
    lladav-convert export-hf --ckpt /ckpt/my-lora --out /ckpt/my-lora-peft --adapter_only

QLoRA (the frozen base stored in int4, adapters in float32): add
`--config.quantize.weights=int4` (or int8). As it is, this config plans 32.6 GiB a chip (an
H100 fits it), QLoRA int4 21.5 GiB (a v6e-1); on a 16 GB chip (v5e-1) QLoRA int4 with rows of
2048 tokens and one 384-px image each plans 12.2 GiB: `--config.quantize.weights=int4
--config.data.seq_len=2048 --config.model.image.max_tiles=2
--config.model.image.max_visual_tokens=1485` (BENCHMARKS.md, "memory plans").

Adapters on other layers: `--config.lora.targets=q,v` (LLaDA: q,k,v,o,gate,up,down) and
`--config.lora.vision_targets=q,v` (SigLIP: q,k,v,o,fc1,fc2, trained at optim.lr.vision).
The connector is frozen here; `--config.optim.lr.connector=1e-5` trains it whole, and then
the merged export carries it (a PEFT adapter holds the LoRA weights only).
"""

from lladav_jax.train.defaults import sft_8b


def get_config():
    c = sft_8b()
    c.data.source = "llava_json"
    # The frozen base in bfloat16 (the adapters stay float32): 16 GB of weights, not 32.
    c.model.param_dtype = "bfloat16"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    # Adapters learn faster than full weights: 2e-4 is the common LoRA rate for 8B models.
    c.optim.lr = dict(vision=0.0, connector=0.0, llm=2e-4)
    # One chip: a global batch of 16 as 16 micro-batches of one row.
    c.data.batch_size = 16
    c.train.grad_accum = 16
    c.data.seq_len = 4096
    c.data.window = 256
    c.data.num_workers = 2
    c.train.checkpoint_every = 200
    return c
