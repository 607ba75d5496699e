"""A plain PyTorch reference of the LLaDA / LLaDA-V sampler (DESIGN.md 3.1), for tests only.

Written from DESIGN.md 3.1 and the official LLaDA `generate`, step by step and row by row, over
transformers' `LlavaOnevisionForConditionalGeneration` made into LLaDA-V (tests/references.py):
the Llama text model is bidirectional through an all-zero 4-D mask, padding is masked there, and
positions count from each prompt's first token (`position_ids`), so a left-padded row decodes as
it would alone.

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
"""

from __future__ import annotations

import numpy as np
import torch

from tests import references as ref


def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, n] masked positions of a block -> [B, steps] commits per step, remainder first."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    counts = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        counts[i, : int(remainder[i])] += 1
    return counts


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
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
    HF forward itself: an answer may hold `image_token_index`, a valid id of the tiny vocab,
    which it would take for an image placeholder.)"""

    def __init__(self, hf, tokens, valid, gen_length, images=None):
        self.hf = hf
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        valid = np.asarray(valid).astype(bool)
        b, p = tokens.shape
        embed = hf.get_input_embeddings()
        with torch.no_grad():
            prompt = embed(tokens)
            if images is not None:  # the image features, in row order, at the placeholders
                pixel_values, image_sizes, is_image = images
                out = hf.model.get_image_features(pixel_values=pixel_values,
                                                  image_sizes=image_sizes, return_dict=True)
                feats = torch.cat(list(out.pooler_output), dim=0)
                where = torch.as_tensor(np.asarray(is_image))[..., None].expand_as(prompt)
                prompt = prompt.masked_scatter(where, feats.to(prompt.dtype))
        self.prompt = prompt
        keys = np.concatenate([valid, np.ones((b, gen_length), bool)], axis=1)
        self.attention_mask = ref.bidirectional_mask(keys.astype(np.int32))
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
    hf,
    tokens,
    valid,
    *,
    mask_id: int,
    eot_id: int,
    forbidden: tuple[int, ...],
    images=None,
    gen_length: int = 128,
    steps: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    seed: int = 0,
) -> dict:
    """tokens [B, P] left-padded prompts, valid [B, P]; images = (pixel_values [N, T, 3, S, S]
    and image_sizes [N, 2] (height, width) of the N images in row order, is_image [B, P] their
    placeholder positions, whose ids do not matter) or None.

    Returns `tokens` [B, gen_length], `committed_at` [B, gen_length] (the step that committed
    each token, -1 never), `steps` (model evaluations run, CFG counted once) and `margin`: the
    closest decision taken (at temperature 0: the smallest gap between the two best logits of
    a position committed; with `low_confidence`, the smallest relative gap between the
    last confidence committed and the next). Another implementation agrees exactly when its
    numerical error stays well below it."""
    forward = Forward(hf, tokens, valid, gen_length, images)
    valid_t = torch.as_tensor(np.asarray(valid).astype(bool))
    prompt = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    b, p = prompt.shape
    x = torch.cat([prompt, torch.full((b, gen_length), mask_id, dtype=torch.long)], dim=1)
    if cfg_scale > 0:  # the unconditional prompt: every prompt token (and image) a mask
        blank = torch.full_like(prompt, mask_id).where(valid_t, prompt)
        uncond_prompt = hf.get_input_embeddings()(blank)
    generator = torch.Generator().manual_seed(seed)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
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
