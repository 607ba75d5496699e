"""The demo with videos and several images per sample: the `tiny` model on the synthetic `mixed`
kind (single-image questions, "Which way does the red circle move?" on an MP4, "Which image
shows the red circle?" on 2-4 images, in turn), minutes on a laptop CPU.

    lladav-train --config configs/demo_video.py --workdir /tmp/lladav-demo-video

Ends like configs/demo.py: held-out masked-answer accuracy (per question type against chance
in WORKDIR/eval.json: motion and pick are 1 in 4), a loss curve in WORKDIR/loss.png.

Images keep the demo's plain layout: under anyres_max_4 a 60-300 px image at 56 px a tile takes
9-37 tiles (base + an AnyRes grid up to 6x6), so every row would carry 37 tiles through the
vision tower. Plain, one image is one 16-token tile and each of several a padded tile of 16
tokens (stage 1's layout of several images: no newline); a video's frames take the video
layout whatever the aspect ratio: up to 8 frames (the synthetic videos' 6-14 s at about a frame
a second: the linspace branch above 8 s), 2x2 pooled tokens and a newline per row, 6 tokens a
frame. What it learns in how long: BENCHMARKS.md, "The demo with videos". The video task
alone is learnt in about 4 minutes (held-out motion accuracy 0.98-1.00):

    lladav-train --config configs/demo_video.py --workdir /tmp/lladav-demo-motion \
        --config.data.synthetic_kind=motion --config.data.batch_size=16 \
        --config.train.steps=800

In this mix the content questions are learnt and the place questions (motion, position) are
not, in 1,536 steps or in 3,072.
"""

from lladav_jax.train.defaults import demo


def get_config():
    c = demo()
    c.data.synthetic_kind = "mixed"
    c.model.video.max_frames = 8
    c.model.image.max_tiles = 8  # 8 frames; 2-4 images
    c.model.image.max_visual_tokens = 64  # 4 images of 16 tokens; 8 frames of 6
    # Single images <= 60 tokens, videos <= 88, 2-4 images <= 107 (demo tokenizer).
    c.data.seq_len = 112
    # No sampler report: its windows need answers fitted with EOS (below; docs/design.md §4.5).
    c.eval.report_windows = ()
    c.data.length_buckets = (64, 96)
    c.data.num_epochs = 3  # 1,536 steps of 32: 16 motion videos a step
    c.data.batch_size = 32
    # Answers as they are (demo.py fits them to windows up to 130, which would not fit 112).
    c.data.answer_window = 0
    return c
