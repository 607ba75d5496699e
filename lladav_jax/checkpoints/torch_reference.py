"""LLaDA-V in PyTorch, as a reference: an exported directory loaded into transformers'
`LlavaOnevisionForConditionalGeneration`, and the plain LLaDA sampler over it (docs/design.md §5.1).

    from lladav_jax.checkpoints import torch_reference as tr
    hf, cfg = tr.load("LLaDA-V-hf")           # `lladav-convert export-hf` output (or the release)
    tokens, valid, images = tr.encode(tokenizer, cfg, image, "What color is the shape?")
    out = tr.generate(hf, tokens, valid, images=images, mask_id=tokenizer.mask_id,
                      eot_id=tokenizer.eot_id, forbidden=SpecialIds.from_tokenizer(tokenizer)
                      .forbidden, gen_length=32, steps=32, block_length=32)

LLaDA is LLaMA without the causal mask: transformers' Llama text model given an all-zero 4-D
attention mask is bidirectional and then equals LLaDA's transformer; padding is masked there,
and positions count from each prompt's first token (`position_ids`), so a left-padded row
decodes as it would alone. The sampler is written from docs/design.md §5.1 and the official LLaDA
`generate`, step by step and row by row:

- The answer (gen_length masks after the prompt) is decoded in blocks of block_length, left to
  right, each with steps / num_blocks steps.
- Each step runs the whole sequence (no cache); classifier-free guidance runs it a second time
  with the prompt (images included) replaced by masks: logits = un + (s + 1) * (cond - un).
- LLaDA-V: EOS, BOS and both header tokens are forbidden at masked positions (logits -inf).
- x0 = argmax (Gumbel noise at temperature > 0); confidence = softmax probability of x0
  (`low_confidence`) or a uniform draw (`random`); -inf at unmasked positions and outside the
  current block. The k most confident masked positions are committed, k from
  `get_num_transfer_tokens` (the block's masked count split over its steps, remainder first).
- A row is done once <|eot_id|> is in its answer with nothing masked before the first one; a
  done row stops changing, and the loop ends when every row is done.

Only temperature 0 is meant to match our JAX sampler exactly (the noise comes from different
generators); `random` remasking and temperature > 0 run here for completeness.

torch and transformers are the `[torch]` extra: this is the only module of the package that
imports them, and nothing imports it but its users (tests, benchmarks, the notebook).
"""

from __future__ import annotations

import json
import os
import pathlib

import ml_collections
import numpy as np
import torch
import transformers
from PIL import Image
from safetensors import safe_open

from lladav_jax.checkpoints import safetensors_io
from lladav_jax.data.image import process_image
from lladav_jax.data.layout import grid_pinpoints
from lladav_jax.data.template import DEFAULT_SYSTEM_PROMPT, encode_prompt
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.diffusion.options import SamplerOptions
from lladav_jax.models import hf_config, hf_params
from lladav_jax.models.config import vision_config

# (pixel_values [N, T, 3, S, S], image_sizes [N, 2] (height, width), is_image [B, P]): the N
# images of a batch in row order and their placeholder positions (whose ids do not matter).
Images = tuple[torch.Tensor, torch.Tensor, np.ndarray]
HFModel = transformers.LlavaOnevisionForConditionalGeneration


# --- The model ------------------------------------------------------------------------------


def llama_config(cfg: ml_collections.ConfigDict) -> transformers.LlamaConfig:
    """LLaDA's transformer as a Llama config (made bidirectional by the mask it is given)."""
    t = cfg.text
    return transformers.LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, rope_theta=t.rope_theta,
        rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
        attn_implementation="eager",
    )


def siglip_config(cfg: ml_collections.ConfigDict) -> transformers.SiglipVisionConfig:
    v = cfg.vision
    return transformers.SiglipVisionConfig(
        hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=v.layer_norm_eps,
        attn_implementation="eager",
    )


def onevision_config(cfg: ml_collections.ConfigDict) -> transformers.LlavaOnevisionConfig:
    """LLaVA-OneVision set up as LLaDA-V: Llama text model, SigLIP vision tower read at
    `select_layer`, anyres_max_N with the (h, w) grid pinpoints of our layout."""
    t, v = cfg.text, cfg.vision
    text, vision = llama_config(cfg), siglip_config(cfg)
    pinpoints = [[h, w] for w, h in grid_pinpoints(v.image_size, cfg.image.max_grid)]
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, vision_feature_layer=v.select_layer,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{cfg.image.max_num_patches}",
        image_grid_pinpoints=pinpoints, projector_hidden_act="gelu",
        image_token_index=t.vocab_size - 1, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    # LLaVA-OneVision has no stage-1 `plain` layout (one tile, no newline); `image_features`
    # reads this to compute it from the model's parts.
    config.lladav_aspect_ratio = cfg.image.aspect_ratio
    return config


# -- Random-weight reference modules (tests and benchmarks) -------------------------------------


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every weight random; norm weights around 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            p.copy_((1.0 if is_norm_weight else 0.0) + scale * torch.randn_like(p))
    return model.float().eval()


def state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy() for k, v in model.state_dict().items()}


def official_from_onevision(model: torch.nn.Module,
                            cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """A LlavaOnevision state dict renamed to the official LLaDA-V keys (ours only)."""
    sd = state_dict(model)
    keys = [k for e in hf_params.lladav_entries(cfg) for k in e.hf_keys()]
    return {k: sd[hf_params.llava_onevision_key(k)] for k in keys}


def read_tensors(hf_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an official-layout directory (sharded with an index, or one file)."""
    # Which files, checked against their index, as the importer finds them; torch reads them.
    files = sorted({t.path for t in safetensors_io.open_checkpoint(hf_dir).values()})
    out = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (not a dict)
    return out


def load(
    hf_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32
) -> tuple[HFModel, ml_collections.ConfigDict]:
    """An official-layout LLaDA-V directory (config.json + safetensors) as transformers'
    LLaVA-OneVision in eval mode, and our model config read from its config.json.

    Every stored tensor must find its place, and every parameter must be stored except those
    LLaDA-V never runs (the vision layers after `select_layer`, SigLIP's pooling head).
    """
    hf_dir = pathlib.Path(hf_dir)
    cfg = hf_config.config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    model = HFModel(onevision_config(cfg))
    state = {hf_params.llava_onevision_key(k): v for k, v in read_tensors(hf_dir).items()}
    result = model.load_state_dict(state, strict=False)
    unused = ("model.vision_tower.head.", *(
        f"model.vision_tower.encoder.layers.{i}."
        for i in range(vision_config(cfg.vision).kept_layers, cfg.vision.num_layers)))
    missing = [k for k in result.missing_keys if not k.startswith(unused)]
    if result.unexpected_keys or missing:
        raise ValueError(f"{hf_dir} does not fit LLaVA-OneVision: unexpected "
                         f"{result.unexpected_keys[:5]}, missing {missing[:5]}")
    return model.to(dtype).eval(), cfg


def bidirectional_mask(key_mask: np.ndarray, num_queries: int | None = None) -> torch.Tensor:
    """[B, L] visible keys -> the 4-D additive mask [B, 1, Lq, L] with no causal part."""
    b, n = key_mask.shape
    lq = n if num_queries is None else num_queries
    mask = np.where(key_mask[:, None, None, :] > 0, 0.0, torch.finfo(torch.float32).min)
    return torch.tensor(np.broadcast_to(mask, (b, 1, lq, n)).copy(), dtype=torch.float32)


@torch.no_grad()
def image_features(
    hf: HFModel, pixel_values: torch.Tensor, image_sizes: torch.Tensor
) -> torch.Tensor:
    """[sum of visual tokens, D]: the images' features in row order, as LLaDA-V lays them out."""
    if getattr(hf.config, "lladav_aspect_ratio", "anyres") == "plain":
        # One tile per image, its tokens in order, no newline (LLaVA's `flat` merge).
        out = hf.model.vision_tower(pixel_values[:, 0].to(hf.dtype), output_hidden_states=True)
        hidden = out.hidden_states[hf.config.vision_feature_layer]
        return hf.model.multi_modal_projector(hidden).flatten(0, 1)
    out = hf.model.get_image_features(pixel_values=pixel_values.to(hf.dtype),
                                      image_sizes=image_sizes, return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0)


def encode(
    tokenizer: Tokenizer, cfg: ml_collections.ConfigDict, image: Image.Image | None, prompt: str, *,
    system: str = DEFAULT_SYSTEM_PROMPT,
) -> tuple[np.ndarray, np.ndarray, Images | None]:
    """One question (with or without an image) as `generate` takes it: tokens [1, P] through
    our chat template, valid [1, P] (all true: no padding) and the images."""
    if image is None:
        tokens, _ = encode_prompt(tokenizer, prompt, [], system=system)
        return tokens[None], np.ones((1, len(tokens)), bool), None
    img = process_image(image if image.mode == "RGB" else image.convert("RGB"), cfg)
    n = img.layout.num_tokens
    tokens, (start,) = encode_prompt(tokenizer, prompt, [n], system=system)
    is_image = np.zeros((1, len(tokens)), bool)
    is_image[0, start:start + n] = True
    pixels = torch.from_numpy(img.tiles.transpose(0, 3, 1, 2).copy())[None]
    sizes = torch.tensor([[img.size[1], img.size[0]]])
    return tokens[None], np.ones((1, len(tokens)), bool), (pixels, sizes, is_image)


# --- The sampler ----------------------------------------------------------------------------


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, n] masked positions of a block -> [B, steps] commits per step, remainder first."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    counts = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        counts[i, : int(remainder[i])] += 1
    return counts


def add_gumbel_noise(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """LLaDA's Gumbel-max sampling in float64: exp(logits) / (-log u)^T."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def row_done(gen: torch.Tensor, mask_id: int, eot_id: int) -> bool:
    """An answer row [G] is done: it holds <|eot_id|> and no mask before the first one."""
    eot = (gen == eot_id).nonzero()
    if len(eot) == 0:
        return False
    return not bool((gen[: int(eot[0])] == mask_id).any())


class Forward:
    """Logits of the whole sequence [B, L] through the HF model's parts (vision features,
    language model, head): the prompt's embeddings, image features scattered in as the HF
    forward does, are computed once; the answer's tokens are embedded every step. (Not the
    HF forward itself: an answer may hold `image_token_index`, a valid id of a small vocab,
    which it would take for an image placeholder.)"""

    def __init__(self, hf: HFModel, tokens: np.ndarray, valid: np.ndarray, gen_length: int,
                 images: Images | None = None):
        self.hf = hf
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        valid = np.asarray(valid).astype(bool)
        b, p = tokens.shape
        embed = hf.get_input_embeddings()
        with torch.no_grad():
            prompt = embed(tokens)
            if images is not None:  # the image features, in row order, at the placeholders
                pixel_values, image_sizes, is_image = images
                feats = image_features(hf, pixel_values, image_sizes)
                where = torch.as_tensor(np.asarray(is_image))[..., None].expand_as(prompt)
                prompt = prompt.masked_scatter(where, feats.to(prompt.dtype))
        self.prompt = prompt
        keys = np.concatenate([valid, np.ones((b, gen_length), bool)], axis=1)
        self.attention_mask = bidirectional_mask(keys.astype(np.int32)).to(prompt.dtype)
        self.position_ids = torch.as_tensor(np.maximum(np.cumsum(keys, axis=1) - 1, 0))
        self.p = p

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
        prompt = self.prompt if prompt_embeds is None else prompt_embeds
        embeds = torch.cat([prompt, self.hf.get_input_embeddings()(x[:, self.p:])], dim=1)
        h = self.hf.model.language_model(
            inputs_embeds=embeds, attention_mask=self.attention_mask,
            position_ids=self.position_ids, use_cache=False,
        ).last_hidden_state
        return self.hf.lm_head(h).float()


@torch.no_grad()
def generate(
    hf: HFModel,
    tokens: np.ndarray,
    valid: np.ndarray,
    *,
    mask_id: int,
    eot_id: int,
    forbidden: tuple[int, ...],
    images: Images | None = None,
    seed: int = 0,
    **options,
) -> dict:
    """tokens [B, P] left-padded prompts, valid [B, P]; images as `Images` or None; `options`
    those of our sampler (`SamplerOptions`' fields and defaults) but its cache and threshold.

    Returns `tokens` [B, gen_length], `committed_at` [B, gen_length] (the step that committed
    each token, -1 never), `steps` (model evaluations run, CFG counted once) and `margin`: the
    closest decision taken (at temperature 0: the smallest gap between the two best logits of
    a position committed; with `low_confidence`, the smallest relative gap between the
    last confidence committed and the next). Another implementation agrees exactly when its
    numerical error stays well below it."""
    o = SamplerOptions(**options)
    if o.allow_eos:
        raise ValueError("allow_eos: the reference is the official sampler (EOS forbidden, "
                         "answers end at <|eot_id|>)")
    if o.cache != "none" or o.threshold is not None:
        raise ValueError(f"cache {o.cache!r}, threshold {o.threshold}: the reference has no "
                         "cache and commits a fixed number of tokens per step")
    gen_length, steps, block_length = o.gen_length, o.steps, o.block_length
    temperature, remasking, cfg_scale = o.temperature, o.remasking, o.cfg_scale
    forward = Forward(hf, tokens, valid, gen_length, images)
    valid_t = torch.as_tensor(np.asarray(valid).astype(bool))
    prompt = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    b, p = prompt.shape
    x = torch.cat([prompt, torch.full((b, gen_length), mask_id, dtype=torch.long)], dim=1)
    if cfg_scale > 0:  # the unconditional prompt: every prompt token (and image) a mask
        blank = torch.full_like(prompt, mask_id).where(valid_t, prompt)
        uncond_prompt = hf.get_input_embeddings()(blank)
    generator = torch.Generator().manual_seed(seed)
    num_blocks = o.num_blocks  # SamplerOptions checked that blocks and steps divide evenly
    steps_per_block = steps // num_blocks

    committed_at = torch.full((b, gen_length), -1, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    step = 0
    margin = np.inf
    for num_block in range(num_blocks):
        start = p + num_block * block_length
        end = start + block_length
        block_mask_index = x[:, start:end] == mask_id
        num_transfer_tokens = get_num_transfer_tokens(block_mask_index, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if not (mask_index[:, start:end] & ~done[:, None]).any():
                break  # the block is decoded (or every row is done)
            logits = forward(x)
            if cfg_scale > 0:
                un_logits = forward(x, uncond_prompt)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            # LLaDA-V: never EOS, BOS or a header token at a masked position.
            for t in forbidden:
                logits[..., t] = torch.where(mask_index, -np.inf, logits[..., t])

            x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)
            top2 = torch.topk(logits[:, start:end], 2, dim=-1).values  # for `margin`
            logit_gap = top2[..., 0] - top2[..., 1]
            if remasking == "low_confidence":
                probs = torch.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(probs, -1, x0[..., None])[..., 0]
            elif remasking == "random":
                x0_p = torch.rand(x0.shape, dtype=torch.float64, generator=generator)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, :start] = -np.inf
            x0_p[:, end:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(-np.inf, dtype=x0_p.dtype))

            for j in range(b):
                if done[j]:
                    continue
                # Most confident first; equal confidences in position order.
                ordered = torch.sort(confidence[j], descending=True, stable=True)
                order, k = ordered.indices, int(num_transfer_tokens[j, i])
                if remasking == "low_confidence" and 0 < k < len(order):
                    gap = float(ordered.values[k - 1] - ordered.values[k])
                    margin = min(margin, gap / float(ordered.values[k - 1]))
                chosen = order[:k]
                chosen = chosen[torch.isfinite(confidence[j, chosen])]
                if temperature == 0 and len(chosen):
                    margin = min(margin, float(logit_gap[j, chosen - start].min()))
                x[j, chosen] = x0[j, chosen]
                committed_at[j, chosen - p] = step
            for j in range(b):
                done[j] = done[j] or row_done(x[j, p:], mask_id, eot_id)
            step += 1
    return {"tokens": x[:, p:].numpy(), "committed_at": committed_at.numpy(), "steps": step,
            "margin": margin}
