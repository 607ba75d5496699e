"""LLaDA-V stage 2b (OneVision SFT): MAmmoTH-VL's 2M mix of single images, several images per
sample and videos, max length 16384.

    lladav-train --config configs/stage2b.py --workdir gs://BUCKET/runs/stage2b \\
        --config.init_from=gs://BUCKET/runs/stage2a --config.tokenizer=gs://BUCKET/runs/stage2a \\
        --config.data.path=/mnt/gcs/mammoth_ov/mix.jsonl \\
        --config.data.image_folder=/mnt/gcs/mammoth_ov/images \\
        --config.data.video_folder=/mnt/gcs/mammoth_ov/videos

One LLaVA JSON(L) holds all three kinds (docs/design.md §2.5, §2.6): `"image": "a.jpg"` (AnyRes),
`"image": ["a.jpg", "b.jpg"]` (each image one padded tile, 730 tokens) and `"video":
"clip.mp4"` (about a frame a second, at most 32, 210 tokens a frame). Frames are tiles, so a
sample holds at most 37 tiles (a 6x6 AnyRes grid and its base tile, or 32 frames). Packed
into ArrayRecord shards (`lladav-data pack-arrayrecord ... --video_folder VIDS`), the videos
travel inside the records: `--config.data.source=array_record`. Check the mesh and memory
first:

    lladav-plan --config configs/stage2b.py --topology v5p-64

The dialogue-causal mask of the paper's ablation: `--config.model.attention_mask=conversation`.
"""

from lladav_jax.train.defaults import sft_8b


def get_config():
    c = sft_8b()
    c.data.source = "llava_json"
    c.data.seq_len = 16384
    c.model.video.max_frames = 32  # the official --frames_upbound 32
    c.model.image.max_tiles = 37
    # 22 images of 730 tokens fill 16384 positions; one AnyRes image takes at most 7290 and
    # 32 frames 6720.
    c.model.image.max_visual_tokens = 16060
    # One 16384-token row's attention (xla implementation) does not fit a chip whole: heads
    # split 4 ways, one row per 4 chips at a time (v5p-64: 45.6 GiB a chip planned; the
    # stage-2a layout, fsdp 32 and 8 micro-batches, needs 169 GiB).
    c.mesh.tensor = 4
    c.train.grad_accum = 32
    return c
