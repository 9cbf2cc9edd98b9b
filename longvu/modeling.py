"""`LongVUForCausalLM`: Qwen2 + frozen SigLIP/DINOv2 towers + SVA connector + projector.

Parameter names equal the original checkpoint keys (`model.mm_projector.*`, `model.vision_sampler_0.*`,
...); the towers live at `model.vision_tower_aux_list.{0,1}.vision_tower.*` (absent from original
checkpoints, optional in ours).

Media enter `forward`/`generate` as flat per-placeholder lists, in the order the IMAGE_TOKEN_INDEX
placeholders appear in the batch (sample 0 first): `pixel_values_siglip[i]` [T,3,S,S],
`pixel_values_dino[i]` [T,3,D,D], `media_sizes[i]` (height, width), `media_kinds[i]` "image"|"video".
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.profiler import record_function
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2PreTrainedModel

from longvu.checkpoint import TOWER_PREFIX, resolve_config
from longvu.compression import item_token_budget
from longvu.config import LongVUConfig, check_override_names, override_fields
from longvu.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, QWEN_ASSISTANT_HEADER_IDS
from longvu.loss import chunked_causal_lm_loss
from longvu.packed_attention import NO_MASKS, VARLEN_ATTENTION, packed_attention_kwargs, register as register_varlen_attention
from longvu.sva import SVALayer, VisionSampler
from longvu.towers import build_towers, load_tower_weights

# the KV-cache argument and output field: `cache` from transformers 5.2x on, `past_key_values` before
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
from longvu.visual import MediaItem, MediaResult, dummy_visual_anchor, encode_media, zero3_partitioned

logger = logging.getLogger(__name__)
register_varlen_attention()
# attention implementations that read a packed row's sample bounds from cu_seq_lens_q/k (no [T, T] mask)
BOUNDS_READERS = (VARLEN_ATTENTION, "flash_attention_2", "flash_attention_3")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' own load report; `from_pretrained` checks the missing keys itself."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _aux_projector(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim))


@dataclass(frozen=True)
class ParamGroup:
    """A named part of LongVUForCausalLM, by parameter-name prefix. `trains_beside_lora`: fully trained
    next to a LoRA adapter (connector, projector); `lora_layers`: the module list whose decoder layers'
    linear layers take the adapters."""

    name: str
    prefixes: tuple[str, ...]
    trains_beside_lora: bool = False
    lora_layers: str | None = None


# The model's parameter groups, declared once: learning rates, trainability and LoRA all read these.
PARAM_GROUPS = (
    ParamGroup("towers", (TOWER_PREFIX,)),
    ParamGroup("projector", ("model.mm_projector.", "model.mm_projector_aux_"), trains_beside_lora=True),
    ParamGroup("connector", ("model.vision_sampler_0.", "model.vision_query", "model.image_newline"),
               trains_beside_lora=True),
    ParamGroup("llm", ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."), lora_layers="model.layers"),
)
PEFT_PREFIX = "base_model.model."


def param_group(name: str) -> ParamGroup:
    """The group of a parameter, named as in LongVUForCausalLM or under a peft wrapper."""
    plain = name.removeprefix(PEFT_PREFIX)
    for group in PARAM_GROUPS:
        if plain.startswith(group.prefixes):
            return group
    raise ValueError(f"{name}: in no LongVU parameter group ({', '.join(g.name for g in PARAM_GROUPS)})")


def lora_target_regex(modules: list[str]) -> str:
    """peft `target_modules` regex: the named linear layers (q_proj, ...) of the decoder layers of the
    groups that declare `lora_layers`."""
    layers = "|".join(re.escape(g.lora_layers) for g in PARAM_GROUPS if g.lora_layers)
    return rf"({layers})\.\d+\.(self_attn|mlp)\.({'|'.join(modules)})"


class LongVUPreTrainedModel(Qwen2PreTrainedModel):
    config: LongVUConfig
    config_class = LongVUConfig
    _no_split_modules = ["Qwen2DecoderLayer", "SVALayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LongVUModel):
            module.vision_query.normal_(std=self.config.vision_hidden_size ** -0.5)
            module.image_newline.normal_(std=self.config.hidden_size ** -0.5)
        elif isinstance(module, SVALayer) and module.has_pos_embed:
            for t in range(module.num_towers):
                getattr(module, f"pos_embed_{t}").normal_()


class LongVUModel(LongVUPreTrainedModel, Qwen2Model):
    """Qwen2Model plus the multimodal modules under their original names."""

    def __init__(self, config: LongVUConfig):
        Qwen2Model.__init__(self, config)
        dim = config.vision_hidden_size
        self.vision_tower_aux_list = build_towers(config)
        for t, tower in enumerate(self.vision_tower_aux_list):
            setattr(self, f"mm_projector_aux_{t}", _aux_projector(tower.hidden_size, dim))
        self.vision_sampler_0 = VisionSampler(
            dim, len(self.vision_tower_aux_list), config.cell_side ** 2, config.connector_depth, config.connector_heads
        )
        self.vision_query = nn.Parameter(torch.randn(1, dim) * dim ** -0.5)
        self.image_newline = nn.Parameter(torch.randn(config.hidden_size) * config.hidden_size ** -0.5)
        self.mm_projector = nn.Sequential(nn.Linear(dim, config.hidden_size), nn.GELU(),
                                          nn.Linear(config.hidden_size, config.hidden_size))
        self._detached_towers: list[nn.Module] = []
        self.post_init()

    @property
    def towers(self) -> nn.ModuleList:
        """[SigLIP, DINOv2], whether registered in the module tree or detached by `detach_towers`."""
        return self._detached_towers[0] if self._detached_towers else self.vision_tower_aux_list

    def detach_towers(self) -> nn.ModuleList:
        """Take the frozen towers out of the module tree (as the original keeps them), so DeepSpeed
        neither partitions nor hooks them: every rank holds a full copy and may run them any number
        of times per step. They are then left out of `state_dict()`; move them with `.to()` yourself."""
        if not self._detached_towers:
            towers = self.vision_tower_aux_list
            del self.vision_tower_aux_list
            self._detached_towers.append(towers)
        return self._detached_towers[0]


@dataclass
class MediaStats:
    """What one forward's visual pipeline did: the length of each sequence after splicing, and per
    media item (placeholder order) the frames decoded and kept, its visual tokens and its regime."""

    sequence_lengths: list[int]
    frames_in: list[int] = field(default_factory=list)
    frames_kept: list[int] = field(default_factory=list)
    visual_tokens: list[int] = field(default_factory=list)
    regimes: list[str] = field(default_factory=list)

    @classmethod
    def from_media(cls, lengths: list[int], media: list[MediaResult]) -> "MediaStats":
        return cls(lengths, [m.frames_in for m in media], [m.kept_indices.numel() for m in media],
                   [m.tokens.shape[0] for m in media], [str(m.regime) for m in media])


@dataclass
class LongVUCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `media`: what the visual pipeline did in this forward (None when
    the forward spliced no media and ran no blank-frame anchor, e.g. a decoding step)."""

    media: MediaStats | None = None


@dataclass
class LongVUGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate(..., return_dict_in_generate=True)` with media: HF's output (`sequences` [B, N] new
    tokens, scores, ...) plus `media`, what the visual pipeline did in prefill."""

    media: MediaStats | None = None


@dataclass
class MultimodalInputs:
    """What the language model consumes: inputs_embeds [B,S,H], attention_mask [B,S], position_ids [B,S],
    labels [B,S] or None, and per media item what the visual pipeline decided. Packed (`pack=True`):
    one row [1, sum of lengths], attention_mask None, position ids restarting at 0 per sample (the
    language model confines attention to each sample from them)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    media: list[MediaResult]
    sequence_lengths: list[int]

    @property
    def stats(self) -> MediaStats:
        return MediaStats.from_media(self.sequence_lengths, self.media)


def _scoring_text(ids: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The text after a placeholder that ranks its frames: up to the end of the first assistant header,
    as in an inference prompt; in a training sample this leaves the answers out.
    ids [L], text [L, H] -> [L', H]."""
    header = torch.tensor(QWEN_ASSISTANT_HEADER_IDS, device=ids.device)
    if ids.numel() >= header.numel():
        hits = (ids.unfold(0, header.numel(), 1) == header).all(dim=1).nonzero()
        if hits.numel():
            return text[: int(hits[0, 0]) + header.numel()]
    return text


class LongVUForCausalLM(LongVUPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: LongVUConfig):
        super().__init__(config)
        self.model = LongVUModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # ---- checkpoints ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, siglip_path=None, dino_path=None,
                        config: LongVUConfig | None = None, **kwargs):
        """The one loader, for every layout: ours (towers inside, or in folders) and the original LongVU
        layout (detected from config.json; compat switches on), towers from `siglip_path`/`dino_path`
        when the weights lack them, else from the folders the config.json names.

        Keyword arguments naming LongVUConfig fields are config overrides (`apply_overrides`: a name
        that is no field is an error); the rest go to HF's loader (dtype, attn_implementation, ...).
        The query count follows the weights; an override to another count creates new `pos_embed_*`
        (logged), any other missing or unexpected tensor is an error. With `config=` given (a Qwen2
        LLM folder turned into LongVU) and `output_loading_info=True`, the caller checks the report."""
        path = pretrained_model_name_or_path
        fields = override_fields()
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        typos = [k for k in kwargs if difflib.get_close_matches(k, fields, n=1, cutoff=0.8)]
        check_override_names(dict.fromkeys(typos), f"{path}: overrides")  # a misspelt field, not a load option
        want_info = kwargs.pop("output_loading_info", False)
        new_queries = False
        if config is None:
            resolved = resolve_config(path, siglip_path, dino_path, overrides)
            config, siglip_path, dino_path = resolved.config, resolved.siglip_path, resolved.dino_path
            new_queries = resolved.weights_query_num != config.image_token_len
        else:
            config.apply_overrides(overrides)
        with _quiet_transformers():  # missing tower keys are expected here and handled below
            model, info = super().from_pretrained(path, *model_args, config=config, output_loading_info=True, **kwargs)
        if any(k.startswith(TOWER_PREFIX) for k in info["missing_keys"]):
            load_tower_weights(model.model.towers, siglip_path or config.siglip_path, dino_path or config.dino_path)
            info["missing_keys"] = {k for k in info["missing_keys"] if not k.startswith(TOWER_PREFIX)}
        if want_info:
            return model, info
        fresh = {k for k in info["missing_keys"] if new_queries and "pos_embed" in k}
        problems = {name: sorted(set(info[name]) - fresh)[:5] for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(problems.values()):
            raise ValueError(f"{path}: weights do not match the LongVU layout: "
                             + ", ".join(f"{k} {v}" for k, v in problems.items() if v))
        if fresh:
            logger.info("switched to %d SVA queries: new position embeddings pos_embed_* initialised (randn), "
                        "%d tensors", config.image_token_len, len(fresh))
        return model

    def save_pretrained(self, save_directory, *args, include_towers: bool = False, **kwargs):
        """Save in our layout (safetensors); the frozen towers only with `include_towers=True`."""
        if not include_towers:
            state = kwargs.get("state_dict") or self.state_dict()
            kwargs["state_dict"] = {k: v for k, v in state.items() if not k.startswith(TOWER_PREFIX)}
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ---- multimodal inputs -------------------------------------------------------------------

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        pixel_values_siglip: list[torch.Tensor],
        pixel_values_dino: list[torch.Tensor],
        media_sizes: list,
        media_kinds: list[str],
        padding_side: str | None = None,
        media_encoder=None,
        pack: bool = False,
    ) -> MultimodalInputs:
        """Splice each media item's visual tokens in at its IMAGE_TOKEN_INDEX placeholder.

        input_ids [B, L] (padding marked by attention_mask), labels [B, L] or None. Visual tokens get
        label IGNORE_INDEX; each sequence is truncated to `tokenizer_model_max_length` and padded on
        `padding_side` (default: config.tokenizer_padding_side); position ids restart at 0 per sample.
        `media_encoder(model.model, items, texts) -> list[MediaResult]` replaces `encode_media`
        (e.g. a `longvu.media_cache.MediaCache` that reuses tower outputs across prompts).
        `pack=True`: the B samples (each spliced, budgeted and truncated exactly as unpacked) are
        concatenated into one row instead of padded (see MultimodalInputs)."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        real = attention_mask.bool() | (input_ids == IMAGE_TOKEN_INDEX)
        is_media = input_ids == IMAGE_TOKEN_INDEX
        n_media = int(is_media.sum())
        if not (n_media == len(pixel_values_siglip) == len(pixel_values_dino) == len(media_sizes) == len(media_kinds)):
            raise ValueError(
                f"{n_media} media placeholders in input_ids but {len(pixel_values_siglip)} siglip / "
                f"{len(pixel_values_dino)} dino pixel tensors, {len(media_sizes)} sizes, {len(media_kinds)} kinds"
            )
        embeds = self.model.embed_tokens(input_ids.masked_fill(is_media, 0))

        samples, items, texts = [], [], []
        for b in range(input_ids.shape[0]):
            keep = real[b]
            ids, emb = input_ids[b][keep], embeds[b][keep]
            lab = labels[b][keep] if labels is not None else None
            cuts = (ids == IMAGE_TOKEN_INDEX).nonzero().squeeze(1).tolist()
            bounds = [-1] + cuts + [ids.numel()]
            spans = list(zip(bounds, bounds[1:]))
            segments = [(emb[s + 1:e], lab[s + 1:e] if lab is not None else None) for s, e in spans]
            samples.append(segments)
            k = len(cuts)  # several media items in one sample share its budget
            regime, token = item_token_budget(cfg, ids.numel(), k), item_token_budget(cfg, ids.numel() - k, k)
            for j in range(k):
                m = len(items)
                kind = media_kinds[m]
                if kind not in ("image", "video"):
                    raise ValueError(f"media_kinds[{m}] = {kind!r}: expected 'image' or 'video'")
                height, width = (int(v) for v in media_sizes[m])
                items.append(MediaItem(pixel_values_siglip[m], pixel_values_dino[m], height, width,
                                       kind == "video", regime, token))
                after = slice(spans[j + 1][0] + 1, spans[j + 1][1])
                texts.append(_scoring_text(ids[after], emb[after]))

        results = (encode_media if media_encoder is None else media_encoder)(self.model, items, texts) if items else []
        assemble = self._pack if pack else self._assemble
        return assemble(samples, results, padding_side or cfg.tokenizer_padding_side, labels is not None)

    def _sequences(self, samples, results: list[MediaResult]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each sample's text segments interleaved with its visual tokens, truncated to
        tokenizer_model_max_length -> (embeddings [n_b, H], labels [n_b]) per sample."""
        max_len = self.config.tokenizer_model_max_length
        seqs, labs, m = [], [], 0
        for segments in samples:
            parts, part_labels = [], []
            for j, (emb, lab) in enumerate(segments):
                parts.append(emb)
                part_labels.append(lab if lab is not None else torch.full((emb.shape[0],), IGNORE_INDEX, device=emb.device))
                if j < len(segments) - 1:
                    vis = results[m].tokens.to(emb.dtype)
                    m += 1
                    parts.append(vis)
                    part_labels.append(torch.full((vis.shape[0],), IGNORE_INDEX, device=emb.device))
            seqs.append(torch.cat(parts)[:max_len])
            labs.append(torch.cat(part_labels)[:max_len])
        return seqs, labs

    def _assemble(self, samples, results: list[MediaResult], padding_side: str, with_labels: bool) -> MultimodalInputs:
        """The samples' sequences padded into [B, max length] on `padding_side`."""
        seqs, labs = self._sequences(samples, results)
        bsz, width = len(seqs), max(s.shape[0] for s in seqs)
        ref = seqs[0]
        embeds = ref.new_zeros(bsz, width, ref.shape[-1])
        mask = torch.zeros(bsz, width, dtype=torch.long, device=ref.device)
        positions = torch.zeros(bsz, width, dtype=torch.long, device=ref.device)
        labels = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long, device=ref.device)
        for b, (seq, lab) in enumerate(zip(seqs, labs)):
            n = seq.shape[0]
            span = slice(width - n, width) if padding_side == "left" else slice(0, n)
            embeds[b, span] = seq
            mask[b, span] = 1
            positions[b, span] = torch.arange(n, device=ref.device)
            labels[b, span] = lab
        return MultimodalInputs(embeds, mask, positions, labels if with_labels else None, results,
                                [s.shape[0] for s in seqs])

    def _pack(self, samples, results: list[MediaResult], padding_side: str, with_labels: bool) -> MultimodalInputs:
        """The samples' sequences concatenated into one row [1, T]; each sample's first label is
        ignored (unpacked it is never a target; packed it would be the previous sample's last one's)."""
        seqs, labs = self._sequences(samples, results)
        labs = [torch.cat([lab.new_full((1,), IGNORE_INDEX), lab[1:]]) for lab in labs]
        positions = torch.cat([torch.arange(s.shape[0], device=s.device) for s in seqs])
        return MultimodalInputs(torch.cat(seqs)[None], None, positions[None],
                                torch.cat(labs)[None] if with_labels else None, results, [s.shape[0] for s in seqs])

    # ---- forward / generate ------------------------------------------------------------------

    def _vision_on_every_rank(self) -> bool:
        """Whether a batch without media still runs the vision path (on a blank frame, adding exactly 0):
        in training, and in evaluation under ZeRO-3 (partitioned parameters), where every rank must call
        each module as often as the others or the parameter gathers fall out of step."""
        return self.training or zero3_partitioned(self.model)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values_siglip: list[torch.Tensor] | None = None,
        pixel_values_dino: list[torch.Tensor] | None = None,
        media_sizes: list | None = None,
        media_kinds: list[str] | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        pack_sequences: bool = False,
        **kwargs,
    ) -> LongVUCausalLMOutput:
        """With labels, the loss is computed chunk-wise and logits are returned only if
        `return_logits=True`; without labels, logits for the last `logits_to_keep` positions (0 = all).
        `output.media` says what the visual pipeline did (see LongVUCausalLMOutput). The KV cache
        comes as `past_key_values` or, from transformers 5.2x on, `cache`.
        `pack_sequences=True` (training, from the packing collator): the B samples of input_ids run as
        one packed row (see `prepare_multimodal_inputs`); logits are then [1, T, V]."""
        cache = kwargs.pop("cache", None)
        cache = past_key_values if cache is None else cache  # an empty cache is falsy, yet a cache
        media = None
        has_media = input_ids is not None and inputs_embeds is None and bool((input_ids == IMAGE_TOKEN_INDEX).any())
        if has_media or (pack_sequences and input_ids is not None and inputs_embeds is None):
            if has_media and pixel_values_siglip is None:
                raise ValueError("input_ids hold media placeholders but no pixel values were given")
            with record_function("longvu/vision"):
                prepared = self.prepare_multimodal_inputs(
                    input_ids, attention_mask, labels, pixel_values_siglip or [], pixel_values_dino or [],
                    media_sizes or [], media_kinds or [], pack=pack_sequences,
                )
            input_ids, inputs_embeds, media = None, prepared.inputs_embeds, prepared.stats
            attention_mask, position_ids, labels = prepared.attention_mask, prepared.position_ids, prepared.labels
            if not has_media and self._vision_on_every_rank():  # a text-only pack: a blank frame (adds 0)
                inputs_embeds = inputs_embeds + dummy_visual_anchor(self.model, inputs_embeds.device).to(inputs_embeds.dtype)
            if pack_sequences:
                use_cache = False  # no cache: attention is confined to each sample by its bounds
                if self.config._attn_implementation in BOUNDS_READERS:  # the bounds, no [T, T] mask
                    kwargs.update(packed_attention_kwargs(prepared.sequence_lengths, inputs_embeds.device))
                    attention_mask = dict(NO_MASKS)
                # else HF builds a block mask from the position ids, which restart per sample
        elif self._vision_on_every_rank() and cache is None:
            lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(input_ids)
            media = MediaStats(lengths)
            # no media in this batch: run the vision path on a blank frame anyway (adds exactly 0)
            inputs_embeds = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            inputs_embeds = inputs_embeds + dummy_visual_anchor(self.model, inputs_embeds.device).to(inputs_embeds.dtype)
            input_ids = None
        with record_function("longvu/llm"):
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                inputs_embeds=inputs_embeds, use_cache=use_cache, **{CACHE_NAME: cache}, **kwargs,
            )
        hidden = out.last_hidden_state
        loss, logits = None, None
        if labels is not None:
            with record_function("longvu/loss"):
                loss = chunked_causal_lm_loss(hidden, labels, self.lm_head, num_items_in_batch)
        if labels is None or return_logits:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep])
        return LongVUCausalLMOutput(
            loss=loss, logits=logits, **{CACHE_NAME: getattr(out, CACHE_NAME)},
            hidden_states=out.hidden_states, attentions=out.attentions, media=media,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values_siglip: list[torch.Tensor] | None = None,
        pixel_values_dino: list[torch.Tensor] | None = None,
        media_sizes: list | None = None,
        media_kinds: list[str] | None = None,
        attention_mask: torch.Tensor | None = None,
        media_encoder=None,
        **kwargs,
    ):
        """Generate with media: the visual pipeline runs once, in prefill; returns only new tokens
        ([B, N]; with `return_dict_in_generate=True` a LongVUGenerateOutput whose `media` says what the
        visual pipeline did). Logits at ids >= config.generation_vocab_size are suppressed.
        `media_encoder`: see `prepare_multimodal_inputs`."""
        limit = self.config.generation_vocab_size
        if limit is not None and limit < self.config.vocab_size and "suppress_tokens" not in kwargs:
            kwargs["suppress_tokens"] = list(range(limit, self.config.vocab_size))
        if input_ids is None or pixel_values_siglip is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        prepared = self.prepare_multimodal_inputs(
            input_ids, attention_mask, None, pixel_values_siglip, pixel_values_dino, media_sizes, media_kinds,
            padding_side="left", media_encoder=media_encoder,
        )
        out = super().generate(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask, **kwargs)
        if isinstance(out, GenerateDecoderOnlyOutput):
            return LongVUGenerateOutput(**out, media=prepared.stats)
        return out


AutoModelForCausalLM.register(LongVUConfig, LongVUForCausalLM)
