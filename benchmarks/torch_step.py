"""The PyTorch side of `train_step.py`: the same train step in PyTorch eager.

transformers' `LlavaOnevisionForConditionalGeneration` configured as in `torch_reference`
(Llama made bidirectional by an all-zero 4-D mask), trimmed to what LLaDA-V runs, the loss of
docs/design.md §4.1 written in torch, `clip_grad_norm_` and `torch.optim.AdamW` (foreach) with the
per-part learning rates given. Imported by `benchmarks/train_step.py` (run as a script, so
this directory is on sys.path); not a command of its own.
"""

from __future__ import annotations

import time

import torch
import transformers

from lladav_jax.checkpoints import torch_reference as ref
from lladav_jax.diffusion import objective


def torch_model(cfg, attn: str) -> torch.nn.Module:
    """transformers' LLaVA-OneVision as LLaDA-V (torch_reference), trimmed to the layers
    LLaDA-V runs: SigLIP without its last layer and pooling head, features at the new last
    layer (the official code deletes them; transformers would run them and discard the
    output)."""
    config = ref.onevision_config(cfg)
    config.vision_config.vision_use_head = False
    config.vision_feature_layer = -1
    kept = config.vision_config.num_hidden_layers + cfg.vision.select_layer + 1
    config.vision_config.num_hidden_layers = kept
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.LlavaOnevisionForConditionalGeneration(config).float()
    return model.train()


def torch_param_groups(model: torch.nn.Module, lrs: dict[str, float]) -> list[dict]:
    """The per-part learning rates; SigLIP's post_layernorm (unused by LLaDA-V) left out."""
    groups = {p: [] for p in lrs}
    for name, p in model.named_parameters():
        if "post_layernorm" in name:
            p.requires_grad_(False)
            continue
        part = ("vision" if "vision_tower" in name else
                "connector" if "multi_modal_projector" in name or "image_newline" in name else
                "llm")
        groups[part].append(p)
    return [dict(params=ps, lr=lrs[part]) for part, ps in groups.items()]


class TorchStep:
    """The same step in PyTorch eager: loss, backward, clip_grad_norm_, AdamW (foreach)."""

    def __init__(self, cfg, batch: dict, info: dict, attn: str, lrs: dict[str, float]):
        self.model = torch_model(cfg, attn)
        groups = torch_param_groups(self.model, lrs)
        self.params = [p for g in groups for p in g["params"]]
        self.num_params = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     foreach=True)
        rows = batch["tokens"].shape[0]
        self.tokens = torch.from_numpy(batch["tokens"]).long()
        self.targets = torch.from_numpy(batch["targets"])
        # (B, T, S, S, 3) -> (B, T, 3, S, S); image_sizes are (height, width).
        self.pixels = torch.from_numpy(batch["pixels"].transpose(0, 1, 4, 2, 3).copy())
        self.image_sizes = torch.tensor([info["image_hw"]] * rows)
        self.mask4d = ref.bidirectional_mask(batch["segment_ids"])
        self.positions = torch.from_numpy(batch["positions"]).long()
        self.mask_id = info["mask_id"]
        self.gen = torch.Generator().manual_seed(0)
        self.losses = []

    def loss(self) -> torch.Tensor:
        """docs/design.md §4.1, one sample per row: t ~ U(0,1), p = (1-eps) t + eps, mask targets
        with probability p, sum of CE / p / L_ans over masked positions, mean over samples."""
        rows, n = self.tokens.shape
        t = torch.rand(rows, 1, generator=self.gen)
        p_mask = (1 - objective.EPS) * t + objective.EPS
        masked = self.targets & (torch.rand(rows, n, generator=self.gen) < p_mask)
        noisy = torch.where(masked, self.mask_id, self.tokens)
        logits = self.model(input_ids=noisy, pixel_values=self.pixels,
                            image_sizes=self.image_sizes, attention_mask=self.mask4d,
                            position_ids=self.positions, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        ce = -logp.gather(-1, self.tokens[..., None])[..., 0]
        l_ans = self.targets.sum(1, keepdim=True).clamp(min=1)
        weight = torch.where(masked, 1.0 / (p_mask * l_ans), 0.0)
        samples = (self.targets.sum(1) > 0).sum().clamp(min=1)
        return (ce * weight).sum() / samples

    def __call__(self) -> None:
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.item())



def torch_peak_flops(size: int = 1024, repeats: int = 5, tries: int = 5) -> float:
    """torch's (MKL) matmul FLOP/s, wall clock, for reference."""
    a = torch.randn(size, size)
    a @ a
    best = 0.0
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ a
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best
