"""Preprocessing shared by inference and training: pixels for both towers and chat tokenisation.

Pixels: each frame is padded to a centred square filled with the tower's mean colour
(``int(255 * mean)``), resized like PIL's default bicubic resize, rescaled by 1/255 and normalised
with the tower's mean/std. The work is vectorised over frames in torch.

Text: the Qwen2 chat template with the system prompt "You are a helpful assistant.". Every media
placeholder (``<image>`` or ``<video>``) becomes one ``IMAGE_TOKEN_INDEX`` (-200), moved to the start
of its turn and followed by ``"\\n"``, as the reference does.

Supervision (labels other than -100): the content of each assistant reply plus its closing
``<|im_end|>``. Not supervised: the system turn, user turns, the ``<|im_start|>assistant\\n`` header
and the ``"\\n"`` after ``<|im_end|>`` (the model never has to produce them: the header is part of
the prompt at inference and generation stops at ``<|im_end|>``). Unlike the reference, newlines and
the chat special tokens inside system and user turns stay masked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from longvu.constants import (
    DEFAULT_SYSTEM_PROMPT,
    DINO_IMAGE_SIZE,
    DINO_MEAN,
    DINO_STD,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDERS,
    IMAGE_TOKEN_INDEX,
    SIGLIP_IMAGE_SIZE,
    SIGLIP_MEAN,
    SIGLIP_STD,
    count_placeholders,
)

logger = logging.getLogger(__name__)

# Upper bound on the float32 working set of one resize call (bytes); frames are processed in
# chunks under this size so that a long 720p clip does not need tens of GiB at once.
_CHUNK_BYTES = 256 * 1024 * 1024


class FrameSize(NamedTuple):
    """Size of a frame in pixels, always carried by name."""

    height: int
    width: int


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def pad_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The reference's square-padding colour for a tower: ``int(255 * mean)`` per channel."""
    return tuple(int(255 * m) for m in mean)  # type: ignore[return-value]


def _as_frames_tensor(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Check ``frames`` and return it as a uint8 tensor ``[T, 3, H, W]``."""
    if isinstance(frames, np.ndarray):
        if not frames.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
            frames = frames.copy()
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a uint8 tensor or ndarray [T, H, W, 3], got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 RGB [T, H, W, 3], got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [T, H, W, 3], got {tuple(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"frames must be non-empty, got shape {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2)


def pad_and_resize(frames: torch.Tensor, size: int, fill: tuple[int, int, int]) -> torch.Tensor:
    """Pad to a centred square of colour ``fill`` and resize to ``size`` like PIL bicubic.

    frames: uint8 ``[T, 3, H, W]`` on any device. Returns float32 ``[T, 3, size, size]`` on that
    device, holding the rounded, clamped 0..255 values that PIL's uint8 resize would produce.
    """
    t, _, h, w = frames.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    fill_t = torch.tensor(fill, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
    out = torch.empty(t, 3, size, size, dtype=torch.float32, device=frames.device)
    chunk = max(1, _CHUNK_BYTES // (3 * side * side * 4))
    for start in range(0, t, chunk):
        part = frames[start : start + chunk]
        canvas = fill_t.expand(part.shape[0], 3, side, side).clone()
        canvas[:, :, top : top + h, left : left + w] = part.to(torch.float32)
        if side != size:
            canvas = F.interpolate(canvas, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            canvas = canvas.round_().clamp_(0, 255)
        out[start : start + part.shape[0]] = canvas
    return out


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """0..255 float ``[T, 3, S, S]`` -> ``(x / 255 - mean) / std``, in place, same shape."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return pixels.div_(255.0).sub_(mean_t).div_(std_t)


TOWER_STATS = {"siglip": (SIGLIP_MEAN, SIGLIP_STD), "dino": (DINO_MEAN, DINO_STD)}


def tower_pixels(frames: torch.Tensor | np.ndarray, tower: str, size: int) -> torch.Tensor:
    """One tower's pixels from uint8 RGB frames ``[T, H, W, 3]`` on any device (the GPU too): pad,
    resize, normalise there. Returns float32 ``[T, 3, size, size]`` on the frames' device, equal to
    ``preprocess_frames`` on the same frames."""
    mean, std = TOWER_STATS[tower]
    return normalise(pad_and_resize(_as_frames_tensor(frames), size, pad_colour(mean)), mean, std)


def preprocess_frames(
    frames: torch.Tensor | np.ndarray,
    siglip_size: int = SIGLIP_IMAGE_SIZE,
    dino_size: int = DINO_IMAGE_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels for both towers from RGB frames.

    frames: uint8 ``[T, H, W, 3]``. Returns ``(siglip [T, 3, siglip_size, siglip_size],
    dino [T, 3, dino_size, dino_size])``, float32, normalised per tower.
    """
    return tower_pixels(frames, "siglip", siglip_size), tower_pixels(frames, "dino", dino_size)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

_SPECIALS = ("<|im_start|>", "<|im_end|>")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ConversationError(ValueError):
    """A conversation that cannot be turned into a training sample; the message says why.

    ``code``: "bad_conversation", "placeholder_mismatch" or "too_long".
    """

    def __init__(self, message: str, code: str = "bad_conversation") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class TokenizedSample:
    """One tokenised conversation. ``input_ids``/``labels``: LongTensor ``[L]``."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    truncated_answer: bool = False


def _strip_placeholders(text: str) -> str:
    for p in IMAGE_PLACEHOLDERS:
        text = text.replace(p, "")
    return text


class _Builder:
    """Accumulates ``(segment, supervised)`` pieces; segments are str (to tokenise) or int ids."""

    def __init__(self) -> None:
        self.pieces: list[tuple[str | int, bool]] = []

    def add(self, piece: str | int, supervised: bool = False) -> None:
        if piece != "":
            self.pieces.append((piece, supervised))

    def add_turn(self, role: str, content: str, n_media: int, strip: bool, supervised: bool) -> None:
        """``<|im_start|>{role}\n`` + placeholders + content + ``<|im_end|>\n``.

        Unsupervised text is tokenised in the same chunks as the reference (split only at special
        tokens and placeholders); a supervised reply is tokenised apart from its header, as the
        model generates it after the prompt.
        """
        self.add("<|im_start|>")
        if n_media:
            content = _strip_placeholders(content)
            if strip:
                content = content.strip()
            self.add(f"{role}\n")
            for k in range(n_media):
                self.add(IMAGE_TOKEN_INDEX)
                self.add("\n" if k < n_media - 1 else "\n" + content, supervised)
        elif supervised:
            self.add(f"{role}\n")
            self.add(content, supervised)
        else:
            self.add(f"{role}\n{content}")
        self.add("<|im_end|>", supervised)
        self.add("\n")

    def encode(self, tokenizer) -> tuple[list[int], list[int]]:
        """Tokenise all string pieces in one batched call; returns ``(ids, labels)``."""
        texts = [p for p, _ in self.pieces if isinstance(p, str)]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        ids: list[int] = []
        labels: list[int] = []
        for piece, supervised in self.pieces:
            piece_ids = [piece] if isinstance(piece, int) else next(encoded)
            if piece in _SPECIALS and len(piece_ids) != 1:
                raise ValueError(f"tokenizer splits {piece!r} into {piece_ids}; use the Qwen2 tokenizer")
            ids.extend(piece_ids)
            labels.extend(piece_ids if supervised else [IGNORE_INDEX] * len(piece_ids))
        return ids, labels


def check_conversation(conversations: Sequence[dict], n_media: int, system: str = DEFAULT_SYSTEM_PROMPT,
                       record_id: str | None = None) -> tuple[str, list[dict]]:
    """Check a conversation's shape; returns ``(system prompt, turns without a system turn)``.

    Turns are ``{"from": "human"|"gpt"|"user"|"assistant", "value": str}``, alternating from a human
    turn, with at least one gpt turn, placeholders only in human turns and ``n_media`` of them in
    total. A leading ``{"from": "system"}`` turn replaces ``system``. Raises ConversationError.
    """
    where = f"record {record_id!r}: " if record_id is not None else ""
    turns = list(conversations)
    if not turns:
        raise ConversationError(f"{where}conversation is empty")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise ConversationError(f"{where}turn {i} must be {{'from': str, 'value': str}}, got {turn!r:.100}")
    if turns[0]["from"] == "system":
        system = turns[0]["value"]
        turns = turns[1:]
    placeholders = 0
    n_answers = 0
    for i, turn in enumerate(turns):
        role = _ROLES.get(turn["from"])
        if role is None:
            raise ConversationError(f"{where}turn {i} has unknown role {turn['from']!r} (expected human or gpt)")
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ConversationError(f"{where}turn {i} is {turn['from']!r} but turns must alternate human, gpt, ...")
        n = count_placeholders(turn["value"])
        if role == "assistant":
            if n:
                raise ConversationError(f"{where}turn {i} (gpt) contains a media placeholder")
            n_answers += 1
        placeholders += n
    if n_answers == 0:
        raise ConversationError(f"{where}conversation has no gpt turn to learn from")
    if placeholders != n_media:
        raise ConversationError(f"{where}{placeholders} media placeholder(s) in the text but {n_media} media item(s)",
                                "placeholder_mismatch")
    return system, turns


def build_prompt_ids(
    tokenizer,
    question: str,
    n_media: int = 1,
    system: str = DEFAULT_SYSTEM_PROMPT,
) -> list[int]:
    """Token ids of the inference prompt, ending with an open ``<|im_start|>assistant\\n``.

    ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n`` with each of the ``n_media`` placeholders as IMAGE_TOKEN_INDEX.
    The question is used verbatim (not stripped); it must not contain placeholders itself.
    """
    if count_placeholders(question):
        raise ValueError("question must not contain <image>/<video>; pass n_media instead")
    b = _Builder()
    b.add_turn("system", system, 0, strip=False, supervised=False)
    b.add_turn("user", question, n_media, strip=False, supervised=False)
    b.add("<|im_start|>")
    b.add("assistant\n")
    return b.encode(tokenizer)[0]


def _pieces(conversations: Sequence[dict], n_media: int, system: str, record_id: str | None) -> _Builder:
    """The checked conversation as chat-template pieces (raises ConversationError)."""
    system, turns = check_conversation(conversations, n_media, system, record_id)
    b = _Builder()
    b.add_turn("system", system, 0, strip=False, supervised=False)
    for turn in turns:
        role = _ROLES[turn["from"]]
        b.add_turn(role, turn["value"], count_placeholders(turn["value"]), strip=True,
                   supervised=role == "assistant")
    return b


def count_conversation_tokens(tokenizer, items: Sequence[tuple[Sequence[dict], int]],
                              system: str = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """Untruncated length of each ``(conversations, n_media)`` as ``tokenize_conversation`` renders
    it (each media placeholder one token), all from one batched tokenizer call; raises
    ConversationError for a conversation ``check_conversation`` rejects."""
    builders = [_pieces(conversations, n_media, system, None) for conversations, n_media in items]
    texts = [p for b in builders for p, _ in b.pieces if isinstance(p, str)]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust core: the same ids, less overhead
    if not texts:
        counts = []
    elif backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers >= 0.21)
        counts = [len(e.ids) for e in encode(texts, add_special_tokens=False)]
    else:
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    lengths = iter(counts)
    return [sum(1 if isinstance(p, int) else next(lengths) for p, _ in b.pieces) for b in builders]


def tokenize_conversation(
    tokenizer,
    conversations: Sequence[dict],
    n_media: int,
    model_max_length: int,
    system: str = DEFAULT_SYSTEM_PROMPT,
    record_id: str | None = None,
) -> TokenizedSample:
    """Render a LLaVA-style conversation with the Qwen2 chat template and build labels.

    conversations: ``[{"from": "human"|"gpt", "value": str}, ...]`` (``user``/``assistant`` are
    accepted too), starting with a human turn and alternating; a leading ``{"from": "system"}``
    turn replaces ``system``. The placeholders in all human turns must number ``n_media``.

    Truncation to ``model_max_length`` keeps every placeholder (a sample whose text before its last
    placeholder does not fit is a ConversationError), sets ``truncated_answer`` and logs a warning
    when supervised tokens are cut, and is a ConversationError if no supervised token is left.
    Returns ``TokenizedSample(input_ids [L], labels [L])`` with ``L <= model_max_length``.
    """
    where = f"record {record_id!r}: " if record_id is not None else ""
    ids, labels = _pieces(conversations, n_media, system, record_id).encode(tokenizer)
    truncated = False
    if len(ids) > model_max_length:
        if n_media:
            last = max(i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX)
            if last >= model_max_length:
                raise ConversationError(f"{where}text before the media placeholder is {last} tokens, "
                                        f"beyond model_max_length {model_max_length}", "too_long")
        truncated = any(lab != IGNORE_INDEX for lab in labels[model_max_length:])
        ids, labels = ids[:model_max_length], labels[:model_max_length]
        if truncated:
            logger.warning("%struncated to model_max_length %d, cutting part of an answer", where, model_max_length)
    if all(lab == IGNORE_INDEX for lab in labels):
        raise ConversationError(f"{where}no answer token left within model_max_length {model_max_length}",
                                "too_long")
    return TokenizedSample(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), truncated)
