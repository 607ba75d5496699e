"""Chat templates: a LLaVA conversation -> token ids, target mask and image placeholder starts.

`llava_llada` (docs/design.md §3.1; stages 2-3):

    <|startoftext|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>  ... more turns

Targets: every assistant turn from its header through its <|eot_id|>, plus <|startoftext|>,
<|start_header_id|>, <|end_header_id|> and <|eot_id|> wherever they occur. System text, user text
and image placeholders never are. `plain` (stage 1): `<image>` + caption + "\\n", targets = the
tokens after the image.

Every position also gets a turn id, for the dialogue-causal attention mask (docs/design.md
§4.3): BOS, the system message and the first exchange are turn 0; each user message that
follows an answer opens the next turn, and its answer belongs to it.

Text between special tokens is encoded piece by piece exactly where the official code's
tokenizer splits it (it adds `<image>` as a special token): "\\n\\n" + content up to the first
`<image>`, then each chunk between tags. Every `<image>` becomes `count` placeholder ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lladav_jax.data.tokenizer import Tokenizer

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
IMAGE_TAG = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}  # LLaVA `from` -> chat role
HEADER_END = "\n\n"  # follows <|end_header_id|>

Turn = Mapping[str, str]  # LLaVA: {"from": "human" | "gpt", "value": text}


@dataclass(frozen=True, eq=False)
class Encoded:
    """tokens int32 [n], targets bool [n]; image k's placeholders start at image_starts[k];
    turn_ids int32 [n], the turn of every position (0 first).

    cut_points: lengths at which the sequence may be cut without cutting a target mid-answer
    (the end of every assistant turn; for `plain`, only the full length).
    """

    tokens: np.ndarray
    targets: np.ndarray
    image_starts: tuple[int, ...]
    cut_points: tuple[int, ...]
    turn_ids: np.ndarray


class _Builder:
    def __init__(self, tokenizer: Tokenizer, image_token_counts: Sequence[int]):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.targets: list[bool] = []
        self.image_starts: list[int] = []
        self.cut_points: list[int] = []
        self.turn_ids: list[int] = []
        self._turn, self._answered = 0, False  # the current turn; its answer has begun
        self._counts: Iterator[int] = iter(image_token_counts)
        self._n_images = len(image_token_counts)

    def add(self, ids: Sequence[int], target: bool) -> None:
        self.ids.extend(ids)
        self.targets.extend([target] * len(ids))
        self.turn_ids.extend([self._turn] * len(ids))

    def special(self, token_id: int) -> None:
        self.add([token_id], True)  # structural tokens are targets everywhere

    def text(self, text: str, target: bool) -> None:
        if text:
            self.add(self.tok.encode(text), target)

    def content(self, text: str, target: bool) -> None:
        """Text with `<image>` tags; each tag becomes its image's placeholders."""
        first, *rest = text.split(IMAGE_TAG)
        self.text(first, target)
        for chunk in rest:
            count = next(self._counts, None)
            if count is None:
                raise ValueError(f"more {IMAGE_TAG} tags than the {self._n_images} images given")
            if count <= 0:
                raise ValueError(f"an image must have at least one visual token, got {count}")
            self.image_starts.append(len(self.ids))
            self.add([self.tok.placeholder_id] * count, False)
            self.text(chunk, target)

    def open_message(self, role: str) -> None:
        """Turn bookkeeping: a user message after an answer opens the next turn."""
        if role == "user" and self._answered:
            self._turn, self._answered = self._turn + 1, False
        self._answered |= role == "assistant"

    def turn(self, role: str, text: str, target: bool) -> None:
        self.open_message(role)
        self.special(self.tok.start_header_id)
        self.text(role, target)
        self.special(self.tok.end_header_id)
        self.content(HEADER_END + text, target)
        self.special(self.tok.eot_id)

    def finish(self) -> Encoded:
        if len(self.image_starts) != self._n_images:
            raise ValueError(
                f"{len(self.image_starts)} {IMAGE_TAG} tags but {self._n_images} images given"
            )
        return Encoded(
            tokens=np.asarray(self.ids, np.int32),
            targets=np.asarray(self.targets, bool),
            image_starts=tuple(self.image_starts),
            cut_points=tuple(self.cut_points),
            turn_ids=np.asarray(self.turn_ids, np.int32),
        )


def _role(turn: Turn, k: int) -> str:
    sender = turn.get("from")
    if sender not in ROLES:
        raise ValueError(f"turn {k}: 'from' must be one of {sorted(ROLES)}, got {sender!r}")
    if sender == "gpt" and IMAGE_TAG in turn["value"]:
        raise ValueError(f"turn {k}: an assistant turn cannot hold an {IMAGE_TAG} tag")
    return sender


def _system(b: _Builder, system: str) -> None:
    b.special(b.tok.bos_id)
    b.turn("system", system, target=False)


def llava_llada(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    image_token_counts: Sequence[int] = (),
    *,
    system: str = DEFAULT_SYSTEM_PROMPT,
) -> Encoded:
    """The `llava_llada` chat: system turn, then every human/gpt turn in order."""
    b = _Builder(tokenizer, image_token_counts)
    _system(b, system)
    for k, turn in enumerate(turns):
        is_answer = _role(turn, k) == "gpt"
        b.turn(ROLES[turn["from"]], turn["value"], target=is_answer)
        if is_answer:
            b.cut_points.append(len(b.ids))
    return b.finish()


def plain(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    image_token_counts: Sequence[int] = (),
    *,
    system: str | None = None,
) -> Encoded:
    """Stage-1 captioning: every image of the human turn, then caption + "\\n" (the targets).

    As in the official `preprocess_plain`, the human text besides its `<image>` tags is dropped;
    "\\n" is encoded with the caption because BPE may merge it with the caption's last characters.
    `system` is accepted (and ignored) so every template has the same signature.
    """
    del system
    if len(turns) != 2 or [t.get("from") for t in turns] != ["human", "gpt"]:
        raise ValueError("the plain template needs exactly one human turn, then one gpt turn")
    _role(turns[1], 1)
    b = _Builder(tokenizer, image_token_counts)
    b.content(IMAGE_TAG * turns[0]["value"].count(IMAGE_TAG), target=False)
    b.text(turns[1]["value"] + "\n", target=True)
    b.cut_points.append(len(b.ids))
    return b.finish()


TEMPLATES = {"llava_llada": llava_llada, "plain": plain}


def encode_conversation(
    name: str,
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    image_token_counts: Sequence[int] = (),
    *,
    system: str = DEFAULT_SYSTEM_PROMPT,
) -> Encoded:
    """Applies the template called `name` (a key of TEMPLATES)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name](tokenizer, turns, image_token_counts, system=system)


def encode_chat_prompt(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    image_token_counts: Sequence[int] = (),
    *,
    system: str = DEFAULT_SYSTEM_PROMPT,
) -> Encoded:
    """The inference prompt of a conversation: LLaVA turns that alternate from a human turn
    and end with one, then `<|start_header_id|>assistant<|end_header_id|>\\n\\n`; the answer
    the sampler appends belongs to the last turn (its `turn_ids`). The images' `<image>` tags
    are in the turns (each takes the next image); if no turn holds one, the last question
    gets one `<image>\\n` per image in front (as the official demo writes it)."""
    turns = [dict(t) for t in turns]
    if not turns or [t.get("from") for t in turns] != [
            "human" if k % 2 == 0 else "gpt" for k in range(len(turns))] or len(turns) % 2 == 0:
        raise ValueError("a prompt's turns alternate from 'human' and end with a 'human' turn, "
                         f"got {[t.get('from') for t in turns]}")
    if not any(IMAGE_TAG in t["value"] for t in turns):
        turns[-1]["value"] = f"{IMAGE_TAG}\n" * len(image_token_counts) + turns[-1]["value"]
    b = _Builder(tokenizer, image_token_counts)
    _system(b, system)
    for k, turn in enumerate(turns):
        b.turn(ROLES[_role(turn, k)], turn["value"], target=False)
    b.open_message("assistant")
    b.special(tokenizer.start_header_id)
    b.text("assistant", False)
    b.special(tokenizer.end_header_id)
    b.text(HEADER_END, False)
    return b.finish()


def encode_prompt(
    tokenizer: Tokenizer,
    question: str,
    image_token_counts: Sequence[int] = (),
    *,
    system: str = DEFAULT_SYSTEM_PROMPT,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The one-question inference prompt (`encode_chat_prompt` of one human turn): system
    turn, user turn, `<|start_header_id|>assistant<|end_header_id|>\\n\\n`. Returns (tokens
    int32 [n], image_starts); the sampler appends mask tokens."""
    enc = encode_chat_prompt(tokenizer, [{"from": "human", "value": question}],
                             image_token_counts, system=system)
    return enc.tokens, enc.image_starts


def answer_start(tokens: np.ndarray, targets: np.ndarray, end_header_id: int) -> int:
    """Where the last answer's region begins: after the last `<|end_header_id|>` (llava_llada:
    the blank line, the answer, its `<|eot_id|>`), else after the last non-target (plain)."""
    headers = np.flatnonzero(tokens == end_header_id)
    if headers.size:
        return int(headers[-1]) + 1
    gaps = np.flatnonzero(~targets)
    return int(gaps[-1]) + 1 if gaps.size else 0


def fit_answer(tokens: np.ndarray, targets: np.ndarray, turn_ids: np.ndarray, eos_id: int,
               end_header_id: int, window: int, limit: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last answer as a decoding window of `window` positions sees it (docs/design.md §4.5):
    its region (`answer_start` on) padded with EOS targets up to `window` (LLaDA's SFT), never
    past `limit` tokens, or cut to `window` where the answer is longer (the window's edge falls
    inside it, as it does when a short gen_length decodes a long answer). The EOS take the last
    turn id. A sample that does not end in a target is returned as it is."""
    n = len(tokens)
    if not targets[-1]:
        return tokens, targets, turn_ids
    end = answer_start(tokens, targets, end_header_id) + window
    if end < n:
        return tokens[:end], targets[:end], turn_ids[:end]
    count = max(0, min(end, limit) - n)
    return (np.concatenate([tokens, np.full(count, eos_id, tokens.dtype)]),
            np.concatenate([targets, np.ones(count, bool)]),
            np.concatenate([turn_ids, np.full(count, turn_ids[-1], turn_ids.dtype)]))


def move_image_tag_first(text: str) -> str:
    """The official `preprocess_multimodal` rule: a turn with exactly one `<image>` tag that is
    not at its start has the tag moved to the front, as `<image>\\n` + the rest stripped."""
    if text.count(IMAGE_TAG) != 1 or text.startswith(IMAGE_TAG):
        return text
    return (IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()).strip()
