"""LoRA on the trained demo: teach it a question it was never trained on, minutes on a CPU.

    lladav-train --config configs/demo.py --workdir /tmp/lladav-demo          # the base, once
    lladav-train --config configs/demo_lora.py --workdir /tmp/lladav-demo-lora \\
        --config.init_from=/tmp/lladav-demo
    lladav-convert export-hf --ckpt /tmp/lladav-demo-lora --out /tmp/demo-peft --adapter_only

The demo's data asks four kinds of question (color, shape, count, position); this run asks only
"Is the circle big?" (yes or no: the synthetic `size` kind), which the base never saw. Only
the adapters (rank 2 on every linear layer of LLaDA and of the vision tower: 6,144 parameters,
3% of the model) train; the base weights and the connector stay frozen and get no optimizer
state. It ends with the held-out accuracy on new `size` questions (benchmarks/
lora_demo.py compares it with the base model's). QLoRA: add --config.quantize.weights=int4.
"""

from lladav_jax.train.defaults import demo


def get_config():
    c = demo()
    c.init_from = "/tmp/lladav-demo"
    c.data.synthetic_kind = "size"
    c.data.size = 4096
    c.data.num_epochs = 1
    c.data.batch_size = 32  # 128 steps
    c.lora.rank = 2
    c.lora.alpha = 4.0
    c.lora.vision_targets = "q,k,v,o,fc1,fc2"  # size is in the pixels: the tower adapts too
    # 3x the demo's rate: fewer weights train, each must move further.
    c.optim.lr = dict(vision=6e-3, connector=0.0, llm=6e-3)
    c.train.checkpoint_every = 64
    return c
