"""Names for what a release was built from that do not leak the builder's directory layout: a
shipped card, mergekit.yaml or fitness.json names a parent by its place in the zoo, the GGUF file
it came from, or its folder name, never by an absolute path that means nothing elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path

from evo.core.config import ExperimentConfig
from evo.search.recipe import Recipe
from evo.zoo.gguf import MARKER as GGUF_MARKER


def portable_name(path: str, cfg: ExperimentConfig) -> str:
    """A parent model's name that does not leak the builder's directory layout: its path inside
    the zoo (``zoo/specialists/de``), the GGUF file it was converted from, or its folder name."""
    p = Path(path)
    marker = p / GGUF_MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            return f"{info['file']} (GGUF, sha256 {info['sha256'][:16]})"
        except (ValueError, KeyError, TypeError):
            pass
    if cfg.zoo:
        zoo = Path(cfg.zoo).resolve()
        try:
            return f"{zoo.name}/{p.resolve().relative_to(zoo).as_posix()}"
        except ValueError:
            pass
    return p.name


def portable_mergekit(recipe: Recipe, paths: dict[str, str], cfg: ExperimentConfig) -> dict:
    """The recipe's mergekit form with every model named by :func:`portable_name` of its
    directory (a user points them at local copies to rebuild the merge)."""
    mk = recipe.mergekit().to_dict()
    if "base_model" in mk:
        mk["base_model"] = portable_name(paths[mk["base_model"]], cfg)
    for entry in [*mk.get("models", []), *(src for sl in mk.get("slices", []) for src in sl["sources"])]:
        entry["model"] = portable_name(paths[entry["model"]], cfg)
    for sl in mk.get("slices", []):
        if "base_model" in sl:
            sl["base_model"] = portable_name(paths[sl["base_model"]], cfg)
    return mk
