"""The long-answer demo: the `tiny` model on the synthetic `describe` kind ("Describe the
shapes." -> "a red circle and a blue square and a green triangle": 2-4 shapes named in reading
order, 7-15 tokens), minutes on a laptop CPU.

    lladav-train --config configs/demo_describe.py --workdir /tmp/lladav-describe
    python benchmarks/sampler_accuracy.py --ckpt /tmp/lladav-describe --kind describe

Answers span several sampler blocks, so this is where the caches' approximations and parallel
decoding can cost accuracy: benchmarks/sampler_accuracy.py scores every cache policy on it by
word accuracy (BENCHMARKS.md, "Sampler accuracy on long answers").
"""

from lladav_jax.train.defaults import demo


def get_config():
    c = demo()
    c.data.synthetic_kind = "describe"
    c.data.system_prompt = "Name the shapes."
    # Answers fitted to windows of up to 34 positions (docs/design.md §4.5): the model ends its
    # own answers in a gen_length of 32. Prompts are up to 60 tokens (demo tokenizer).
    c.data.answer_window = 34
    c.data.seq_len = 96
    c.data.length_buckets = (64, 96)
    c.eval.report_windows = (32,)
    return c
