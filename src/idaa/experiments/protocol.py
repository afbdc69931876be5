"""Reproduction protocols (`idaa reproduce PROTOCOL.yaml`): variants x seeds of one base recipe, read and checked.

A protocol names a base preset and settings shared by every run, the seeds, and the variants (each a few
pretrain settings over the base). Two kinds of variant are resolved only once the runs they depend on have
finished, and the resolution is kept in `<out>/resolved.json` so it never changes under finished runs:

- `match_time_of: V` (compute-matched baseline): the variant's epochs are chosen so that its training time
  equals V's mean training time, at the per-epoch training time measured on `rate_from` (default: the
  reference variant, usually plain SimCLR). Its cosine schedule spans all of its own epochs. With
  `match_by: knn-units` both times are counted in each run's own kNN evaluations (the same work in every run),
  so machine load and machine kind cannot bend the match; `seconds` (the default) uses raw seconds.
  `plus_vae_time: true` adds the training time of V's VAE (its `metrics.jsonl`) to V's: what a user pays.
- `best_of: [V1, V2, ...]`: the settings of whichever candidate has the highest mean final kNN accuracy, then
  the variant's own settings on top (e.g. another eps for the best IDAA variant).

Pairs under `compare` are reported at equal epochs; pairs under `compare_time` at equal training time, for two
variants that cost the same by construction (e.g. another eps of a matched IDAA variant against that variant's
compute-matched baseline); the report shows both training times, so the match can be checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idaa.errors import IdaaError
from idaa.experiments.runner import as_mapping, read_vae_block
from idaa.train.config import FIELDS, read_preset

PROTOCOL_KEYS = {"base", "settings", "vae", "seeds", "variants", "reference", "compare", "compare_time", "linear",
                 "out", "match_by"}
MATCH_BY = ("seconds", "knn-units")  # knn-units: training time in units of the run's own kNN evaluations
DEFERRED_KEYS = {"match_time_of", "rate_from", "best_of", "plus_vae_time"}
VARIANT_KEYS = (FIELDS - {"out", "seed"}) | DEFERRED_KEYS
LINEAR_KEYS = {"variants", "limit"}
NAME = re.compile(r"[A-Za-z0-9+._-]+")


@dataclass
class Variant:
    """One line of the grid: its settings over the base, and what it waits for if it is resolved later."""

    name: str
    settings: dict[str, Any]
    match_time_of: str | None = None
    rate_from: str | None = None
    best_of: list[str] = field(default_factory=list)
    plus_vae_time: bool = False  # the matched time also counts the training of the matched variant's VAE

    @property
    def deferred(self) -> bool:
        return bool(self.match_time_of or self.best_of)

    @property
    def depends_on(self) -> list[str]:
        """The variants whose finished runs this one needs before it can be planned."""
        return [v for v in (self.match_time_of, self.rate_from) if v] + self.best_of


@dataclass
class Protocol:
    """A parsed, validated protocol with the command-line overrides applied."""

    path: Path
    preset: dict[str, Any]
    overrides: dict[str, Any]
    vae: dict[str, Any] | None
    seeds: list[int]
    variants: dict[str, Variant]
    reference: str | None
    compare: list[tuple[str, str]]
    compare_time: list[tuple[str, str]]
    linear: list[str]
    linear_limit: int | None
    out: Path
    publish: Path | None = None
    match_by: str = "seconds"
    # the file's seeds: a compute-matched or best-of variant is measured over all of them, whatever --seeds
    # trains now, so training seed by seed matches the same budget as training every seed at once
    match_seeds: list[int] = field(default_factory=list)
    # the file's variants, whatever --variants selects: a VAE's seconds convert at the speed of any of the grid's
    # runs timed beside it
    grid_variants: dict[str, Variant] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.match_seeds = self.match_seeds or list(self.seeds)
        self.grid_variants = self.grid_variants or dict(self.variants)


def _names(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise IdaaError(f"{what} must be a list of variant names")
    return list(value)


def parse_seeds(value: Any, what: str = "--seeds") -> list[int]:
    """Seeds from a YAML list or a comma-separated string ("0,1,2"); anything but distinct integers is an error."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise IdaaError(f"{what} must list at least one integer seed, e.g. 0,1,2")
    seeds = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not re.fullmatch(r"-?\d+", text):
            raise IdaaError(f"{what} must be integers, e.g. 0,1,2; got {item!r}")
        seeds.append(int(text))
    if len(set(seeds)) != len(seeds):
        raise IdaaError(f"{what} lists a seed twice")
    return seeds


def _read_variant(name: str, value: Any) -> Variant:
    if not NAME.fullmatch(name):
        raise IdaaError(f"variant name {name!r} may only use letters, digits and + . _ -")
    settings = as_mapping(value, f"variants.{name}")
    unknown = sorted(set(settings) - VARIANT_KEYS)
    if unknown:
        raise IdaaError(f"unknown setting(s) {', '.join(unknown)} in variant '{name}'")
    match, rate = settings.pop("match_time_of", None), settings.pop("rate_from", None)
    plus_vae = settings.pop("plus_vae_time", False)
    if not isinstance(plus_vae, bool) or (plus_vae and match is None):
        raise IdaaError(f"variant '{name}': plus_vae_time must be true or false, and goes with match_time_of")
    best = _names(settings.pop("best_of"), f"variants.{name}.best_of") if "best_of" in settings else []
    if match is not None and best:
        raise IdaaError(f"variant '{name}' sets both match_time_of and best_of; choose one")
    if match is not None and "epochs" in settings:
        raise IdaaError(f"variant '{name}' sets epochs and match_time_of; its epochs come from the matched time")
    if rate is not None and match is None:
        raise IdaaError(f"variant '{name}' sets rate_from without match_time_of")
    for key, ref in (("match_time_of", match), ("rate_from", rate)):
        if ref is not None and not isinstance(ref, str):
            raise IdaaError(f"variants.{name}.{key} must name a variant")
    return Variant(name, settings, match, rate, best, plus_vae)


def _check_references(variants: dict[str, Variant], reference: str | None) -> None:
    for variant in variants.values():
        if variant.match_time_of and variant.rate_from is None:
            if reference is None:
                raise IdaaError(f"variant '{variant.name}' needs rate_from (the variant whose epoch time to use)")
            variant.rate_from = reference
        for dep in variant.depends_on:
            if dep not in variants:
                raise IdaaError(f"variant '{variant.name}' refers to unknown variant '{dep}'")
            if dep == variant.name:
                raise IdaaError(f"variant '{variant.name}' refers to itself")
    _stages(variants)  # raises on a cycle


def _stages(variants: dict[str, Variant]) -> list[list[str]]:
    """Variants grouped so that every one comes after those it depends on (protocol order within a group)."""
    placed: dict[str, int] = {}
    while len(placed) < len(variants):
        progress = False
        for name, variant in variants.items():
            if name not in placed and all(d in placed for d in variant.depends_on):
                placed[name] = 1 + max((placed[d] for d in variant.depends_on), default=-1)
                progress = True
        if not progress:
            raise IdaaError("the variants' match_time_of / best_of references form a cycle: "
                            + ", ".join(n for n in variants if n not in placed))
    return [[n for n, s in placed.items() if s == stage] for stage in range(max(placed.values()) + 1)]


def _pairs(data: dict[str, Any], key: str) -> list[tuple[str, str]]:
    """The protocol's `key` list of [first, second] variant-name pairs."""
    pairs = []
    for pair in data.get(key) or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
            raise IdaaError(f"{key} entries must be pairs of variant names, e.g. [idaa, none]; got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def _with_dependencies(chosen: list[str], variants: dict[str, Variant]) -> list[str]:
    """The chosen variants plus everything they need, in protocol order."""
    wanted, todo = set(), list(chosen)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += variants[name].depends_on
    return [n for n in variants if n in wanted]


def read_protocol(path: str | Path, data_dir: str | None = None, vae: str | None = None,
                  seeds: str | list[int] | None = None, variants: str | None = None,
                  out: str | None = None, max_steps: int | None = None, publish: str | None = None) -> Protocol:
    """Parse and check a protocol file and the command-line overrides; relative paths are the working directory's.

    `publish` is the folder that keeps a copy of the report and of every finished run's record (see
    `idaa.experiments.reproduce`), e.g. under docs/, so the grid survives the loss of its run folders.
    """
    path = Path(path)
    data = read_preset(path, fields=PROTOCOL_KEYS)
    base = data.get("base")
    preset = read_preset(base) if isinstance(base, str) else as_mapping(base, "base")
    settings = as_mapping(data.get("settings"), "settings")
    unknown = sorted(set(settings) - (FIELDS - {"out", "seed"}))
    if unknown:
        raise IdaaError(f"unknown setting(s) {', '.join(unknown)} in settings of '{path}'")
    preset.update(settings)
    table = as_mapping(data.get("variants"), "variants")
    if not table:
        raise IdaaError(f"'{path}' has no variants: add e.g. 'variants: {{none: {{}}, idaa: {{adversary: idaa}}}}'")
    grid = {str(name): _read_variant(str(name), value) for name, value in table.items()}
    reference = data.get("reference", "none" if "none" in grid else None)
    if reference is not None and reference not in grid:
        raise IdaaError(f"reference '{reference}' is not one of the variants")
    _check_references(grid, reference)
    compare, compare_time = _pairs(data, "compare"), _pairs(data, "compare_time")
    linear = as_mapping(data.get("linear"), "linear")
    unknown = sorted(set(linear) - LINEAR_KEYS)
    if unknown:
        raise IdaaError(f"unknown linear setting(s) {', '.join(unknown)}; allowed: variants, limit")
    linear_variants = _names(linear.get("variants", []), "linear.variants")
    limit = linear.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise IdaaError(f"linear.limit must be an integer >= 1, got {limit!r}")
    for name in [v for pair in compare + compare_time for v in pair] + linear_variants:
        if name not in grid:
            raise IdaaError(f"'{name}' (in compare or linear) is not one of the variants: {', '.join(grid)}")
    chosen = grid if variants is None else _selected(variants, grid)
    compare = [pair for pair in compare if pair[0] in chosen and pair[1] in chosen]
    compare_time = [pair for pair in compare_time if pair[0] in chosen and pair[1] in chosen]
    linear_variants = [v for v in linear_variants if v in chosen]
    overrides = {k: v for k, v in (("data_dir", data_dir), ("vae", vae), ("max_steps", max_steps)) if v is not None}
    target = Path(str(out or data.get("out") or f"runs/reproduce-{path.stem}"))
    match_by = data.get("match_by", "seconds")
    if match_by not in MATCH_BY:
        raise IdaaError(f"match_by must be one of {', '.join(MATCH_BY)}, got {match_by!r}")
    if publish is not None and Path(publish).resolve() == target.resolve():
        raise IdaaError(f"--publish '{publish}' is the report folder itself; name another folder, e.g. docs/...")
    return Protocol(path, preset, overrides, read_vae_block(data.get("vae")),
                    parse_seeds(seeds if seeds is not None else data.get("seeds", [0]),
                                "--seeds" if seeds is not None else "seeds"),
                    chosen, reference if reference in chosen else None, compare, compare_time, linear_variants,
                    limit, target, Path(publish) if publish is not None else None, match_by,
                    parse_seeds(data.get("seeds", [0]), "seeds"), grid)


def _selected(variants: str, grid: dict[str, Variant]) -> dict[str, Variant]:
    """The variants --variants names, with those they depend on."""
    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    missing = [v for v in chosen if v not in grid]
    if not chosen or missing:
        raise IdaaError(f"--variants: unknown variant(s) {', '.join(missing) or '(none given)'}; the protocol "
                        f"has {', '.join(grid)}")
    return {n: grid[n] for n in _with_dependencies(chosen, grid)}


def stages(protocol: Protocol) -> list[list[str]]:
    """The protocol's variants in the order they can run (dependencies first)."""
    return _stages(protocol.variants)
