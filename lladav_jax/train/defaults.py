"""Every training setting with its default; the files in `configs/` start from here.

    lladav-train --config configs/demo.py --workdir /tmp/lladav-demo --config.train.steps=50
"""

from __future__ import annotations

import ml_collections

from lladav_jax.data.template import DEFAULT_SYSTEM_PROMPT
from lladav_jax.models.config import TEXT_TARGETS
from lladav_jax.models.variants import model_config


def base_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = model_config(variant)
    # tokenizer.json (or its directory); "" = the built-in demo tokenizer (small models only).
    c.tokenizer = ""
    # Where the weights start: a model directory (lladav-convert output), a training workdir
    # (its latest checkpoint) or one step directory; "" = random initialisation.
    c.init_from = ""
    c.seed = 0
    # LoRA (rank > 0): adapters on the listed layers train, every base weight is frozen and
    # gets no optimizer state; optim.lr.llm / .vision are the adapters' rates, and the
    # connector trains fully while optim.lr.connector > 0. Targets: q,k,v,o,gate,up,down
    # (LLaDA) and q,k,v,o,fc1,fc2 (vision_targets, SigLIP), comma-separated.
    c.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=16.0, dropout=0.0, targets=",".join(TEXT_TARGETS), vision_targets=""))
    # QLoRA: the frozen base stored as int8 or int4 (one scale per `tile` inputs) under LoRA.
    c.quantize = ml_collections.ConfigDict(dict(weights="none", tile=128, vision=False))
    c.model.lora = c.lora  # the same objects: --config.lora.rank=8 sets the model's too
    c.model.quantize = c.quantize

    c.data = ml_collections.ConfigDict(dict(
        # synthetic | llava_json | array_record | tfds | mixture; never guessed (config_check)
        source="synthetic",
        path="",  # LLaVA JSON/JSONL (llava_json), shard folder or glob (array_record),
        image_folder="",  # TFDS directory (tfds)
        video_folder="",  # llava_json: where `video` paths are (default: the data file's dir)
        split="train",  # tfds split
        mixture=[],  # for `mixture`: dicts of source, path, image_folder, split, weight
        size=4096,  # synthetic: samples in the train split
        synthetic_kind="qa",  # synthetic: qa | caption | size | motion | pick | mixed
        eval_size=256,  # held-out samples of the end-of-training report (synthetic or eval_path)
        eval_path="",  # the held-out set of `eval.every` (synthetic runs: the test split)
        eval_source="",  # its kind ("" = source's; llava_json for a mixture)
        eval_split="test",  # tfds split of eval_path
        template="llava_llada",  # or plain (stage 1)
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        overlong="drop",  # or truncate (after a whole answer, never inside one)
        # > 0: the last answer is fitted to the sample's window, 2 to this many positions after
        # the assistant header (log-uniform, by sample id): followed by EOS targets up to it, or
        # cut at it, so the model learns to end its own answers in any gen_length up to it
        # (LLaDA's SFT; docs/design.md §4.5). 0: answers as they are, the official recipe.
        answer_window=0,
        seq_len=256,
        batch_size=16,  # global, split over processes, then over grad_accum micro-batches
        num_epochs=1,
        window=256,  # samples planned together (packing / length grouping)
        pack=False,
        group_by_length=True,
        length_buckets=(),  # batch lengths (default: seq_len / 4, / 2, seq_len)
        num_workers=0,  # Grain worker processes per host
        max_skip_fraction=0.1,
        min_seen_for_abort=500,
        seed=0,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=dict(vision=2e-6, connector=1e-5, llm=1e-5),  # 0 freezes a part
        warmup_ratio=0.03,
        clip_norm=1.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=0,  # 0: num_epochs passes over the data
        grad_accum=1,
        log_every=10,
        checkpoint_every=500,
        keep_checkpoints=3,
        async_checkpoints=True,
        max_nonfinite_in_a_row=20,
        peak_tflops_per_device=0.0,  # 0: known chips by name; the CPU is measured
        progress_bar=True,
        # Several processes agree on a preemption (SIGTERM) at logging and checkpoint steps
        # and every this many steps (0: logging steps only); one process checks every step.
        preemption_check_every=0,
        on_bad_checkpoint="fallback",  # or fail: a latest checkpoint that does not restore
        complementary_masking=False,  # LaViDa (design §4.4); rows run twice: ~2x memory, FLOPs
        # The head (and its logits) only at masked positions, this many at a time; 0: at every
        # position, [B, L, vocab] logits (objective.head_loss_terms).
        head_chunk=0,
    ))
    # Validation every `every` steps (0: none) on the held-out set (train/validation.py).
    c.eval = ml_collections.ConfigDict(dict(
        every=0,
        samples=256,
        t_grid=(0.1, 0.3, 0.5, 0.7, 0.9),  # masking rates of eval_loss
        max_answer_tokens=8,  # answers scored for eval_accuracy
        seed=0,
        # The end-of-training report (train/heldout.py, on data.eval_size held-out samples) adds
        # generation accuracy through the sampler at these answer windows (gen_length = steps =
        # block_length), e.g. (4, 16, 128) as the demos do; () none (an 8b model would spend
        # minutes a window).
        report_windows=(),
    ))
    # Weights & Biases (optional, `pip install wandb`): metrics rows go to `project` too.
    # mode: online | offline (synced later with `wandb sync`) | disabled.
    c.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", mode="online"))
    # slices: TPU slices of a multislice job; the data axis spans them (DCN).
    # rules: (logical axis, mesh axes) pairs replacing the default logical-axis rules of those
    # names (scale/sharding.py DEFAULT_RULES); () keeps them all. Mesh axes: "data", "fsdp",
    # "tensor", a tuple of them, or None (not split). E.g. embeddings replicated:
    # --config.mesh.rules="(('embed', None),)".
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, slices=1, rules=()))
    # auto: jax.distributed.initialize() when a cluster is detected (TPU pod, SLURM);
    # explicit: the three fields below; off: one process.
    c.distributed = ml_collections.ConfigDict(dict(
        mode="auto", coordinator="", num_processes=0, process_id=-1,
    ))
    return c


def sft_8b() -> ml_collections.ConfigDict:
    """Stages 2-3 (docs/design.md §9.1): the 8b model, everything trains, vision 2e-6, rest 1e-5,
    global batch 256, bf16, gradient checkpointing, cosine with 3% warmup, one epoch."""
    c = base_config("8b")
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.source = "array_record"
    c.data.seq_len = 8192
    c.data.batch_size = 256
    # 8 micro-batches of 32 rows: one 8192-token row per chip of a v5p-64 at a time, which
    # `lladav-plan --topology v5p-64` finds fits (56.3 of 85.5 GiB); the whole batch at once
    # needs ~400 GiB a chip. On N chips in the batch axes, 256 / N micro-batches.
    c.train.grad_accum = 8
    c.data.window = 2048
    c.data.num_workers = 8
    c.data.overlong = "truncate"
    c.optim.lr = dict(vision=2e-6, connector=1e-5, llm=1e-5)
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    return c


def demo() -> ml_collections.ConfigDict:
    """The demo (configs/demo.py): the tiny model on the synthetic data, minutes on a CPU."""
    c = base_config("tiny")
    # One 56-px tile per image (the stage-1 plain layout) and a one-line system prompt: every
    # sample fits 64 tokens, so a 2-core CPU runs thousands of steps in minutes.
    c.model.image.aspect_ratio = "plain"
    c.model.image.max_tiles = 1
    c.model.image.max_visual_tokens = 16
    c.data.system_prompt = "Answer in one word."
    # 0.02-std kernels leave a 64-wide model's attention uniform for ~1,500 steps (the demo sat
    # at chance); N(0, 1/d_in) leaves it within ~600 (docs/design.md §4.5).
    c.model.init = "fan_in"
    c.data.size = 16384
    c.data.eval_size = 512
    c.data.num_epochs = 3
    c.data.batch_size = 16  # 3,072 steps
    c.data.window = 512
    # No worker process: Grain's read thread featurizes up to two windows ahead of the step in
    # this process. On 2 cores a worker cost more than it gave (start-up, shared-memory copies;
    # BENCHMARKS.md, "The demo's input").
    c.data.num_workers = 0
    c.optim.lr = dict(vision=2e-3, connector=2e-3, llm=2e-3)
    # The 1/p_mask weight makes rare, very large gradients (an answer masked at small t); a
    # shorter second-moment memory (b2 0.95, not 0.999) lets Adam recover from them within
    # tens of steps. Held-out accuracy after 1,500 steps at lr 1e-3: 0.54 with 0.95, 0.25-0.39
    # with 0.999. This config: 0.742 (chance 0.25), the same with 0 or 1 data workers.
    c.optim.b2 = 0.95
    c.train.log_every = 32
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.eval.report_windows = (4, 16, 128)
    # Answers fitted to windows of up to 130 positions (docs/design.md §4.5), so the model ends
    # its own answers at any gen_length up to 128. Prompts are up to 60 tokens.
    c.data.answer_window = 130
    c.data.seq_len = 192
    c.data.length_buckets = (64, 96, 128, 192)
    return c
