"""The Python API: `lladav_jax.load(DIR)` -> a `Model` that answers questions about images.

    import lladav_jax as lv
    m = lv.load("workdir")                      # a model dir, a training workdir or a step dir
    m.generate("cat.png", "What is this?", gen_length=32, steps=32, block_length=32)
    m.generate_batch([("a.png", "Color?"), (["b.png", "c.png"], "Same?")], cache="dual")
    m.generate(lv.Video("clip.mp4"), "What happens?")   # or video="clip.mp4"
    m.generate("cat.png", ["What is this?", "What color?"])  # several questions: a list back
    m.generate("cat.png", [{"from": "human", "value": "What is this?"},   # a conversation:
                           {"from": "gpt", "value": "A cat."},            # LLaVA turns, ending
                           {"from": "human", "value": "What color?"}])    # with a question
    m8 = lv.load("workdir", quantize="int8")   # weight-only int8 (or int4), quantized as it loads

Images may be PIL images, paths or encoded bytes; one image gets AnyRes, each of several a
padded tile, a video (`media.Video`) its frames (`inference/media.py`). A prompt without
`<image>` tags gets one `<image>\\n` per image (or video) in front (of its last question).
A prompt is one question (a str) or a conversation (`template.encode_chat_prompt`); a model
trained with the conversation mask gets its turn ids. Prompts of a batch are left-padded to a
common length (rounded up to PROMPT_BUCKET so that nearby lengths share a compiled program).
The images' vision features are computed once and kept (`Model.feature_cache`,
inference/features.py): a conversation's later turns and other questions reuse them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from lladav_jax.checkpoints import modeldir
from lladav_jax.data.image import ProcessedImage
from lladav_jax.data.layout import collate_visual
from lladav_jax.data.template import DEFAULT_SYSTEM_PROMPT, Turn, encode_chat_prompt
from lladav_jax.data.tokenizer import Tokenizer
from lladav_jax.diffusion.options import SamplerOptions, SpecialIds
from lladav_jax.diffusion.sampler import compiled_generate
from lladav_jax.inference import features
from lladav_jax.inference.media import Video, Visual, process_visual
from lladav_jax.models import lladav
from lladav_jax.models.config import ModelConfig, QuantConfig
from lladav_jax.models.lladav import LLaDAV
from lladav_jax.scale import memory, sharding

PROMPT_BUCKET = 64  # prompt lengths are padded up to a multiple of this (fewer recompiles)

Images = Visual  # one image, a list of images, a `Video`, or None
Prompt = str | Sequence[Turn]  # one question, or LLaVA turns from human to human


@dataclasses.dataclass(frozen=True)
class Generation:
    """One answer with the sampler's record of it."""

    text: str  # the answer: the text before <|eot_id|>
    ids: list[int]  # its token ids
    tokens: np.ndarray  # [gen_length] every generated position (mask id where it stopped early)
    committed_at: np.ndarray  # [gen_length] the step that committed each token, -1 never
    steps: int  # denoising steps the batch ran
    refreshes: int  # full passes over the whole sequence among them (sampler.generate)


@dataclasses.dataclass(frozen=True)
class BlockDone:
    """What `on_block` receives after each block: the answer so far (`text`, decoded when
    first read: a server reads it only for the rows that stream)."""

    index: int
    num_blocks: int
    tokens: np.ndarray  # [gen_length]; masks in blocks not decoded yet
    done: bool  # <|eot_id|> reached: later blocks add nothing
    model: Model = dataclasses.field(repr=False, compare=False)

    @functools.cached_property
    def text(self) -> str:
        return self.model.answer(self.tokens)[0]


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    """One item's prompt as the sampler takes it (`Model.prepare`)."""

    tokens: np.ndarray
    images: list[tuple[ProcessedImage, int]]  # (image, placeholder start in the prompt)
    turn_ids: np.ndarray  # int32 [n]: the dialogue turn of each token (0 first)
    visual_key: features.Key  # its images' features in the cache (features.key)


class Model:
    """A loaded LLaDA-V with its tokenizer; compiled samplers are cached per option set.

    Not thread-safe: one generation at a time (the streaming callback is per call).
    """

    def __init__(self, module: LLaDAV, config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 sampler_defaults: Mapping[str, Any] | None = None):
        self.module, self.config, self.tokenizer = module, config, tokenizer
        # The system prompt every call uses unless it names one: the one the model was
        # trained with when loaded from a training workdir (a model answers best under it).
        self.system_prompt = system_prompt
        # Sampler options that follow from how the model was trained (`sampler_defaults`),
        # used where a call does not set them.
        self.sampler_defaults = dict(sampler_defaults or {})
        self.special_ids = SpecialIds.from_tokenizer(tokenizer)
        self.feature_cache_bytes = features.MAX_BYTES  # before the first image is encoded
        self._samplers: dict[tuple[SamplerOptions, bool], Callable] = {}
        self._listener: Callable | None = None
        self._lock = threading.Lock()

    # -- prompts ---------------------------------------------------------------------------------
    def _encode(self, images: Images, prompt: Prompt, system: str) -> PreparedPrompt:
        turns = _turns(prompt)
        processed = process_visual(images, self.config)
        tiles = sum(p.tiles.shape[0] for p in processed)
        visual = sum(p.layout.num_tokens for p in processed)
        limits = self.config.image
        if tiles > limits.max_tiles or visual > limits.max_visual_tokens:
            raise ValueError(
                f"the {len(processed)} image(s) of prompt {turns[-1]['value'][:40]!r} need "
                f"{tiles} tiles and {visual} visual tokens; the model takes at most "
                f"image.max_tiles={limits.max_tiles} and image.max_visual_tokens="
                f"{limits.max_visual_tokens}"
            )
        enc = encode_chat_prompt(
            self.tokenizer, turns, [p.layout.num_tokens for p in processed], system=system
        )
        self._check_turns(enc.turn_ids, turns)
        return PreparedPrompt(enc.tokens, list(zip(processed, enc.image_starts, strict=True)),
                              enc.turn_ids, features.key(processed))

    @functools.cached_property
    def typed_config(self) -> ModelConfig:
        """The model's typed config (built once: every prompt reads it)."""
        return ModelConfig.from_config(self.config)

    @property
    def conversation(self) -> bool:
        """Whether the model attends under the conversation mask (it then reads turn ids)."""
        return self.typed_config.attention_mask == "conversation"

    def _check_turns(self, turn_ids: np.ndarray, turns: Sequence[Turn]) -> None:
        # The conversation mask's splash passes stop at max_turns (models.attention).
        cfg = self.typed_config
        n = int(turn_ids.max()) + 1
        if cfg.attention_mask == "conversation" and n > cfg.max_turns:
            raise ValueError(f"the conversation ending {turns[-1]['value'][:40]!r} has {n} "
                             f"turns; the model takes at most max_turns={cfg.max_turns}")

    @property
    def max_positions(self) -> int:
        """The longest prompt + answer this model takes: `text.max_position_embeddings`, the
        length it was trained for. RoPE itself sets no hard limit, but positions past it were
        never trained, and a long enough sequence only fails on the device, out of memory."""
        return int(self.config.text.max_position_embeddings)

    def _check_length(self, p: PreparedPrompt, gen_length: int, where: str) -> None:
        # Positions count from each prompt's first token (the left padding takes none).
        limit, n = self.max_positions, len(p.tokens)
        if n + gen_length > limit:
            visual = sum(img.layout.num_tokens for img, _ in p.images)
            raise ValueError(
                f"{where}the prompt is {n} tokens ({visual} of them image tokens) and the answer "
                f"gen_length {gen_length}: more than the model's maximum of {limit} positions "
                "(text.max_position_embeddings); shorten the prompt or gen_length")

    def _collate(self, prompts: list[PreparedPrompt], gen_length: int, rows: int | None = None,
                 prompt_len: int | None = None, visual: bool = False) -> dict[str, np.ndarray]:
        """The sampler's batch: prompts left-padded to `prompt_len` (default: the longest,
        rounded up to PROMPT_BUCKET), `rows` rows (default: one per prompt; the rest repeat the
        first prompt, their answers dropped), the visual inputs when any prompt has images or
        `visual` (fixed shapes either way: a server compiles each shape once)."""
        longest = max(len(p.tokens) for p in prompts)
        p_len = prompt_len or -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
        if p_len < longest:
            raise ValueError(f"prompt_len {p_len} < the longest prompt's {longest} tokens")
        if rows is not None and rows < len(prompts):
            raise ValueError(f"rows {rows} < {len(prompts)} prompts")
        prompts = prompts + prompts[:1] * ((rows or len(prompts)) - len(prompts))
        tokens = np.full((len(prompts), p_len), self.tokenizer.pad_id, np.int32)
        valid = np.zeros((len(prompts), p_len), bool)
        placed = []
        for i, p in enumerate(prompts):
            pad = p_len - len(p.tokens)
            tokens[i, pad:], valid[i, pad:] = p.tokens, True
            placed.append([(img, start + pad) for img, start in p.images])  # left padding
        batch = {"tokens": tokens, "valid": valid}
        if self.conversation:
            turn_ids = np.zeros((len(prompts), p_len), np.int32)
            for i, p in enumerate(prompts):
                turn_ids[i, p_len - len(p.tokens):] = p.turn_ids
            batch["turn_ids"] = turn_ids
        if visual or any(placed):
            # Unused visual slots point at p_len + gen_length: past the end, dropped.
            batch.update(collate_visual(placed, self.config, p_len + gen_length,
                                        with_pixels=False))
            batch["features"] = self.feature_cache.batch(
                [(p.visual_key, [img for img, _ in p.images]) for p in prompts])
        return batch

    @functools.cached_property
    def feature_cache(self) -> features.FeatureCache:
        """The vision features of the prompts' images, computed once (inference/features.py)."""
        cfg = self.config
        return features.FeatureCache(self.module, int(cfg.image.max_tiles),
                                     int(cfg.vision.image_size), self.feature_cache_bytes)

    # -- sampling --------------------------------------------------------------------------------
    def _sampler(self, options: SamplerOptions, streaming: bool) -> Callable:
        key = (options, streaming)
        if key not in self._samplers:
            # One trampoline per model: a new on_block per call must not recompile.
            hook = self._on_block if streaming else None
            self._samplers[key] = compiled_generate(self.module, options, self.special_ids, hook)
        return self._samplers[key]

    def _on_block(self, block, tokens) -> None:
        if self._listener is not None:
            self._listener(int(block), np.asarray(tokens))

    def _is_end(self, tokens: np.ndarray) -> np.ndarray:
        return (tokens == self.special_ids.eot) | (tokens == self.special_ids.eos)

    def ended(self, tokens: np.ndarray) -> bool:
        """Whether a row of generated tokens holds an end (<|eot_id|> or EOS)."""
        return bool(np.any(self._is_end(np.asarray(tokens))))

    def answer(self, tokens: np.ndarray) -> tuple[str, list[int]]:
        """(text, ids) of one row of generated tokens: everything before the first <|eot_id|>
        or EOS."""
        tokens = np.asarray(tokens)
        eot = np.flatnonzero(self._is_end(tokens))
        ids = tokens[: eot[0]] if eot.size else tokens
        ids = [int(t) for t in ids if t != self.special_ids.mask]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids

    def options(self, **options) -> SamplerOptions:
        """The sampler options of a call: those given over the model's defaults over the
        sampler's; a TypeError names an unknown one, a ValueError one out of range."""
        unknown = sorted(set(options) - set(SamplerOptions.defaults()))
        if unknown:
            raise TypeError(f"unexpected sampler options {unknown}; the sampler's options are "
                            f"{list(SamplerOptions.defaults())}")
        return SamplerOptions(**{**self.sampler_defaults, **options})

    def prepare(self, images: Images, prompt: Prompt, options: SamplerOptions,
                system: str | None = None, where: str = "") -> PreparedPrompt:
        """One item encoded and checked against the model's limits (ValueError naming the
        fault): what `decode` takes."""
        p = self._encode(images, prompt, self.system_prompt if system is None else system)
        self._check_length(p, options.gen_length, where)
        return p

    def decode(self, prompts: Sequence[PreparedPrompt], options: SamplerOptions, rng: jax.Array, *,
               rows: int | None = None, prompt_len: int | None = None, visual: bool = False,
               on_block: Callable[[list[BlockDone]], Any] | None = None) -> list[Generation]:
        """Answers for prepared prompts, decoded as one batch. `rng`: one key, or one per row
        (then each answer is the same in any batch: `unmasking.row_keys`). `rows`, `prompt_len`,
        `visual`: a fixed batch shape (`_collate`). `on_block(blocks)` gets one BlockDone per
        prompt after every block."""
        prompts = list(prompts)
        n = len(prompts)
        sampler = self._sampler(options, on_block is not None)

        def listener(block: int, tokens: np.ndarray) -> None:
            on_block([BlockDone(block, options.num_blocks, row, self.ended(row), self)
                      for row in tokens[:n]])

        with self._lock:  # the feature cache too
            batch = self._collate(prompts, options.gen_length, rows, prompt_len, visual)
            self._listener = listener if on_block is not None else None
            try:
                out = jax.device_get(sampler(batch, rng))
            finally:
                self._listener = None
        tokens, committed_at = np.asarray(out["tokens"])[:n], np.asarray(out["committed_at"])[:n]
        counts = int(out["steps"]), int(out["refreshes"])
        return [Generation(*self.answer(row), row, at, *counts)
                for row, at in zip(tokens, committed_at, strict=True)]

    def generate_batch(
        self,
        items: Sequence[tuple[Images, Prompt]],
        *,
        seed: int = 0,
        on_block: Callable[[list[BlockDone]], Any] | None = None,
        return_details: bool = False,
        system: str | None = None,
        **options,
    ) -> list[str] | list[Generation]:
        """Answers for (images, prompt) pairs, decoded together as one batch; a prompt is a
        question or a conversation (LLaVA turns from human to human, `generate`).

        `options`: the sampler's, named as `SamplerOptions`' fields (gen_length, steps, cache,
        threshold, ...); those not given take its defaults. `on_block(blocks)` gets one
        BlockDone per item after every block (for streaming). Row i draws its random numbers
        from `seed` folded with i (`unmasking.row_keys`).
        """
        try:
            opts = self.options(**options)  # checked first
        except TypeError as e:
            raise TypeError(f"generate_batch() got {e}") from None
        if not items:
            return []
        prompts = [self.prepare(images, prompt, opts, system,
                                f"item {i}: " if len(items) > 1 else "")
                   for i, (images, prompt) in enumerate(items)]
        results = self.decode(prompts, opts, jax.random.key(seed), on_block=on_block)
        return results if return_details else [r.text for r in results]

    def generate(
        self,
        images: Images,
        prompt: Prompt,
        *,
        on_block: Callable[[BlockDone], Any] | None = None,
        return_details: bool = False,
        video: str | os.PathLike | bytes | None = None,
        **options,
    ) -> str | Generation | list[str] | list[Generation]:
        """The answer to `prompt` about `images` (one image, a list, a `Video`, or None), or
        about `video` (a path or bytes: `Video(video)`, given instead of images). `prompt`: a
        question, or a conversation `[{"from": "human", "value": ...}, {"from": "gpt", ...},
        ..., {"from": "human", ...}]` whose last question is answered; a conversation longer
        than the model's `max_turns` is a ValueError. Several questions (a list of str) about
        the same images get a list of answers, decoded as one batch, the images encoded once.

        Options: those of `generate_batch` (the sampler's, `SamplerOptions`, with its
        defaults), seed=0, system=None (the model's `system_prompt`).
        `on_block(BlockDone)` is called after every block; `return_details` gives a Generation
        (ids, commit steps) instead of text.
        """
        if video is not None:
            if images is not None:
                raise ValueError("give images or a video, not both")
            images = Video(video)
        if not isinstance(prompt, str) and prompt and all(isinstance(q, str) for q in prompt):
            if on_block is not None:
                raise ValueError("on_block streams one answer: ask several questions with "
                                 "generate_batch(on_block=...)")
            return self.generate_batch([(images, q) for q in prompt],
                                       return_details=return_details, **options)
        stream = None if on_block is None else (lambda blocks: on_block(blocks[0]))
        (result,) = self.generate_batch([(images, prompt)], on_block=stream,
                                        return_details=return_details, **options)
        return result


def text_delta(shown: str, text: str, final: bool = False) -> str:
    """What a block's answer `text` adds to the `shown` part ("" if nothing, or if it does not
    extend it). Before the last block, a character cut by the block's end (U+FFFD) waits for
    the next: streaming by `lladav-generate --stream` and by the server's events."""
    text = text if final else text.rstrip("\ufffd")
    return text[len(shown):] if text.startswith(shown) else ""


def _turns(prompt: Prompt) -> list[Turn]:
    """A prompt as LLaVA turns: a question is one human turn."""
    if isinstance(prompt, str):
        return [{"from": "human", "value": prompt}]
    if not prompt:
        raise ValueError("a conversation prompt needs at least one human turn, got none")
    return list(prompt)


def weight_bytes(module: nnx.Module) -> int:
    """Bytes of every parameter of `module` (concrete or abstract: shapes and dtypes only), int4
    counted at half a byte (XLA packs it two to a byte on accelerators)."""
    return sum(memory.nbytes(x.shape, x.dtype)
               for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def quantization(quantize: str | None, tile: int = 128, vision: bool = False) -> QuantConfig:
    """The weight quantization that `load` applies: `quantize` none (None) | int8 | int4 for the
    language model's linear layers, head and embedding table; `tile` inputs per int4 scale;
    `vision` the vision tower's linear layers too. A ValueError names a setting out of range."""
    try:
        return QuantConfig(weights=quantize or "none", tile=tile, vision=vision)
    except ValueError as e:  # QuantConfig names the config fields; the caller gave arguments
        raise ValueError(str(e).replace("quantize.weights", "quantize").replace(
            "quantize.tile", "quantize_tile")) from None


def check_quantization(config: ml_collections.ConfigDict, quant: QuantConfig) -> None:
    """A ValueError naming the int4 tile if it does not divide an input width of a layer the
    model would quantize; checked on the abstract model, before any weight is read."""
    if quant.weights == "none":
        return
    typed = ModelConfig.from_config(config)
    try:
        lladav.abstract(dataclasses.replace(typed.plain(), quantize=quant))
    except ValueError as e:
        if "quantize.tile" not in str(e):  # not the tile (`quant.tile_for`): as it is
            raise
        raise ValueError(f"quantize_tile={quant.tile} does not fit this model ({e}); int4 "
                         "keeps one scale per tile inputs of a layer, so the tile must divide "
                         "every quantized layer's input width") from None


def load(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
         rules: sharding.Rules | None = None, *, quantize: str | None = None,
         quantize_tile: int = 128, quantize_vision: bool = False) -> Model:
    """A Model from a model directory, a training workdir (its latest step) or a step directory;
    with a mesh the parameters are restored sharded, logical axes mapped by `rules` (default:
    the rules of the training run that wrote `path`, its `mesh.rules` over DEFAULT_RULES).

    `quantize` int8 | int4: weight-only quantization as the weights load, one stored array at a
    time (the float model is never whole in memory): the language model's linear layers, head
    and embedding table, and with `quantize_vision` the vision tower's linear layers (off by
    default: the tower is small and its features feed every answer). int8 has one scale per
    output channel; int4 one per `quantize_tile` inputs. Activations and the sampler's caches
    stay in the compute dtype. A setting the model cannot take is a ValueError naming it,
    raised before any weight is read."""
    quant = quantization(quantize, quantize_tile, quantize_vision)
    paths = modeldir.resolve(path)
    check_quantization(modeldir.load_config(path), quant)
    if mesh is not None and rules is None:
        mesh_config = modeldir.run_config(paths.tokenizer_dir).get("mesh", {})
        rules = sharding.logical_rules(mesh_config.get("rules"))
    module, config = modeldir.load_model(path, mesh=mesh, rules=rules or sharding.DEFAULT_RULES,
                                         quantize=quant if quant.weights != "none" else None)
    tokenizer = Tokenizer.load(paths.tokenizer_dir)
    run = modeldir.run_config(paths.tokenizer_dir)
    return Model(module, config, tokenizer, trained_system_prompt(paths.tokenizer_dir),
                 sampler_defaults(run.get("data", {})))


def sampler_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler options a training run's `data` settings imply: `allow_eos` for a model
    trained with EOS after its answers (`data.answer_window` > 0), which fills its window with
    EOS; none for the official recipe."""
    return {"allow_eos": True} if int(data.get("answer_window", 0) or 0) > 0 else {}


def trained_system_prompt(directory: str | os.PathLike) -> str:
    """The system prompt of the training run that wrote `directory` (its train_config.json),
    else the official default."""
    data = modeldir.run_config(directory).get("data", {})
    if data.get("template", "llava_llada") == "llava_llada" and "system_prompt" in data:
        return data["system_prompt"]
    return DEFAULT_SYSTEM_PROMPT
