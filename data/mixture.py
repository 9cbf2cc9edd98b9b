"""Training on several datasets at once: per-source sampling of manifests into one record list.

``data.train_manifest`` is one of:

- a manifest (``.json``/``.jsonl``): all its records;
- a LLaVA-NeXT data YAML (``.yaml``/``.yml``), the form LLaVA-NeXT's ``train.py`` reads::

      datasets:
        - json_path: /data/llava_video_178k/0_30_s_academic.jsonl
          sampling_strategy: all          # all | first:N | first:N% | end:N | end:N% | random:N | random:N%
        - json_path: /data/videochat2/manifest.jsonl
          sampling_strategy: random:30%
          media_root: /data/videochat2    # ours: where that source's media paths start

  ``N%`` is ``ceil(N * len / 100)`` records, as in LLaVA-NeXT; ``random`` draws with the run's
  seed (LLaVA-NeXT uses the global ``random`` state), so the mixture is the same on every rank and
  after a resume. Relative ``json_path``s are taken as written (from the working directory), as
  LLaVA-NeXT does;
- a list of entries, each a manifest path or a mapping ``{json_path, sampling_strategy?, weight?,
  media_root?}``. ``weight`` scales a source after its strategy: 2.0 repeats every record twice,
  0.5 keeps a seeded random half, 1.5 repeats all once plus a random half.

A source's media root is its ``media_root``, else ``data.media_root``, else its manifest's folder.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import yaml

_STRATEGY = re.compile(r"^(all|first|end|random)(?::(\d+(?:\.\d+)?)(%?))?$")


class MixtureError(ValueError):
    """A mixture spec that cannot be used; the message names the file or entry and the reason."""


@dataclass(frozen=True)
class Source:
    """One dataset of a mixture."""

    path: str
    strategy: str = "all"
    weight: float = 1.0
    media_root: str | None = None

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


@dataclass
class Mixture:
    """The records of every source, in source order, with per-record media roots and source index."""

    records: list[dict]
    roots: list[str]
    source_index: np.ndarray  # int32 [N]
    sources: list[Source]

    def counts(self) -> dict[str, int]:
        """Records per source (by manifest name, then path when names collide)."""
        n = np.bincount(self.source_index, minlength=len(self.sources))
        names = [s.name for s in self.sources]
        dup = {k for k, v in Counter(names).items() if v > 1}
        return {(s.path if s.name in dup else s.name): int(n[i]) for i, s in enumerate(self.sources)}


def _entry(value, where: str) -> Source:
    if isinstance(value, str):
        return Source(value)
    if not isinstance(value, dict) or not isinstance(value.get("json_path", value.get("path")), str):
        raise MixtureError(f"{where}: expected a manifest path or a mapping with 'json_path', got {value!r:.120}")
    unknown = set(value) - {"json_path", "path", "sampling_strategy", "weight", "media_root"}
    if unknown:
        raise MixtureError(f"{where}: unknown key(s) {sorted(unknown)}")
    weight = value.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise MixtureError(f"{where}: weight must be a positive number, got {weight!r}")
    source = Source(value.get("json_path", value.get("path")), str(value.get("sampling_strategy", "all")),
                    float(weight), value.get("media_root"))
    if not _STRATEGY.match(source.strategy.strip()):
        raise MixtureError(f"{where}: sampling_strategy {source.strategy!r}: expected all, first:N[%], end:N[%] "
                           "or random:N[%]")
    return source


def parse_spec(spec) -> list[Source]:
    """The sources of ``data.train_manifest`` (a path, a data YAML or a list); MixtureError if malformed."""
    if isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
        try:
            with open(spec, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise MixtureError(f"{spec}: cannot read the data YAML: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
            raise MixtureError(f"{spec}: expected 'datasets:' a list of {{json_path, sampling_strategy}} entries")
        return [_entry(v, f"{spec}: datasets[{i}]") for i, v in enumerate(data["datasets"])]
    if isinstance(spec, str):
        return [Source(spec)]
    if isinstance(spec, list) and spec:
        return [_entry(v, f"data.train_manifest[{i}]") for i, v in enumerate(spec)]
    raise MixtureError(f"data.train_manifest: expected a manifest path, a data YAML or a list, got {spec!r:.120}")


def select(n: int, strategy: str, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Indices (int64) of the records a source contributes: its strategy, then its weight."""
    kind, number, percent = _STRATEGY.match(strategy.strip()).groups()
    count = n if number is None else min(n, math.ceil(float(number) * n / 100) if percent else int(float(number)))
    if kind == "first":
        idx = np.arange(count)
    elif kind == "end":
        idx = np.arange(n - count, n)
    elif kind == "random":
        idx = np.sort(rng.permutation(n)[:count])
    else:
        idx = np.arange(n)
    whole, part = int(weight), weight - int(weight)
    extra = np.sort(rng.permutation(idx)[: round(part * len(idx))])
    return np.concatenate([np.tile(idx, whole), extra]).astype(np.int64)


def load_mixture(spec, seed: int, media_root: str | None = None) -> Mixture:
    """Read and sample every source of ``spec``; deterministic given ``seed``."""
    from data.manifest import read_manifest  # imports torch: kept out of parse_spec (pre-launch checks)

    sources = parse_spec(spec)
    records: list[dict] = []
    roots: list[str] = []
    index: list[np.ndarray] = []
    for k, source in enumerate(sources):
        rows = read_manifest(source.path)
        idx = select(len(rows), source.strategy, source.weight, np.random.default_rng([seed, k]))
        root = source.media_root or media_root or str(os.path.dirname(os.path.abspath(source.path)))
        records += [rows[i] for i in idx.tolist()]
        roots += [root] * len(idx)
        index.append(np.full(len(idx), k, dtype=np.int32))
    return Mixture(records, roots, np.concatenate(index), sources)
