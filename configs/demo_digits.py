"""The real-data demo: the `tiny` model on scikit-learn's handwritten digits posed as VQA
("What digit is this?" -> "seven"), 1,500 training scans, 297 held out; minutes on a CPU.

    lladav-data digits --out /tmp/lladav-digits
    lladav-train --config configs/demo_digits.py --workdir /tmp/lladav-digits-run
    lladav-eval --ckpt /tmp/lladav-digits-run --data /tmp/lladav-digits/test.jsonl \\
        --out /tmp/lladav-digits-answers.jsonl

The data files default to /tmp/lladav-digits (`--config.data.path=DIR/train.json
--config.data.eval_path=DIR/test.json` elsewhere). Training ends with the held-out report of
configs/demo.py on the 297 test scans: masked-answer accuracy and generation accuracy at answer
windows of 4, 16 and 128 tokens. What it reaches in how long: BENCHMARKS.md, "Answer length:
the demos through the sampler".
"""

from lladav_jax.train.defaults import demo


def get_config():
    c = demo()
    c.data.source = "llava_json"
    c.data.path = "/tmp/lladav-digits/train.json"
    c.data.eval_path = "/tmp/lladav-digits/test.json"
    c.data.eval_size = 297
    c.data.num_epochs = 40
    c.data.batch_size = 16  # 40 epochs: 3,750 steps
    # One 14-px tile of one patch: an 8x8 scan is one visual token. At 56 px (16 tokens) the
    # connector's features told the digits apart (a linear probe: 97.6% held out) but the
    # 2-layer language model read them out slowly: masked-answer accuracy after 30 epochs 0.79
    # at 16 tokens, 0.88 at 4, 0.99 at 1 (BENCHMARKS.md, "Answer length").
    c.model.vision.image_size = 14
    # Answers fitted to windows of up to 130 positions (docs/design.md §4.5): the model ends
    # its own answers in any gen_length up to 128. Prompts are 38 tokens.
    c.data.answer_window = 130
    c.data.seq_len = 176
    c.data.length_buckets = (48, 96, 176)
    return c
