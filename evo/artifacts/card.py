"""A release's model card (README.md), rendered from ``templates/card.md.j2``: what the model is,
its parents, its fitness, how it was chosen, what it was compared with, its lineage and recipe.
Here the fitness record is shaped into rows; the template only lays them out.
"""
from __future__ import annotations

from functools import lru_cache

import jinja2
import numpy as np
import yaml

from evo.core.config import ExperimentConfig
from evo.data.draws import SPLIT_TEXT
from evo.artifacts.manifest import MANIFEST
from evo.artifacts.portable import portable_name
from evo.search.recipe import Recipe

ANY_SPLIT = "blocks of the evaluation sets"  # what a split without its own SPLIT_TEXT covers


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    # Markdown, not HTML: nothing is escaped; a field the template names but the record lacks fails
    env = jinja2.Environment(loader=jinja2.PackageLoader("evo.artifacts", "templates"), autoescape=False,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters["num"] = lambda v: f"{v:.4f}"
    env.filters["signed"] = lambda v: f"{v:+.4f}"
    return env


def render_card(recipe: Recipe, paths: dict[str, str], fitness: dict, cfg: ExperimentConfig) -> str:
    """The card of ``recipe`` built from ``paths`` with ``fitness`` (fitness.json as shipped)."""
    objectives = fitness["objectives"]
    rel = fitness.get("release")
    return _environment().get_template("card.md.j2").render(
        title=cfg.name,
        what_it_is=what_it_is(recipe),
        parents=[("base", portable_name(paths["base"], cfg)),
                 *[(e.model, portable_name(paths[e.model], cfg)) for e in recipe.merge.models if e.model != "base"],
                 *[(m, portable_name(paths[m], cfg)) for m in path_models(recipe)]],
        fitness=fitness,
        objectives=objectives,
        stream=fitness.get("stream"),
        drift=_drift(fitness.get("stream")),
        against=_against(fitness),
        release=rel,
        split_rows=[(split, [vals.get(n, float("nan")) for n in objectives])
                    for split, vals in fitness.get("values_by_split", {}).items() if vals] if rel else [],
        margins=_margins(fitness) if rel else None,
        comparison=_comparison(fitness, cfg),
        lineage=fitness.get("lineage") or [],
        recipe_yaml=yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip(),
        manifest=MANIFEST,
    )


def path_models(recipe: Recipe) -> list[str]:
    """Models a data-flow path takes layers from that the merge does not already name."""
    named = {"base", "merged", *(e.model for e in recipe.merge.models)}
    return sorted({s.model for s in recipe.path.steps} - named) if recipe.path else []


def what_it_is(recipe: Recipe) -> str:
    """The card's first sentence: the merge, and the layer path when the recipe has one."""
    merge = (f"A `{recipe.merge.merge_method}` merge of {len(recipe.merge.models)} models over a common base"
             if not recipe.path or recipe.path.uses_merge else "A stack of layers taken from the parent models")
    if not recipe.path:
        return merge + ", found by evo's evolutionary search."
    steps, n = recipe.path.steps, recipe.path.num_layers
    used = {}
    for s in steps:
        used[s.model] = used.get(s.model, 0) + 1
    scaled = sum(1 for s in steps if s.scale != 1.0)
    return (f"{merge}, run as a data-flow path of **{len(steps)} layers** (the parents have {n}): "
            + ", ".join(f"{k} layers from {m}" for m, k in used.items())
            + (f"; {scaled} of them with their residual update scaled" if scaled else "")
            + ". Found by evo's evolutionary search; `mergekit.yaml` builds it as mergekit `slices`.")


def _drift(stream: dict | None) -> list[tuple[str, float]]:
    """A stream release's retention lost since each older version's anchor, by version."""
    drift = (stream or {}).get("retention_drift") or {}
    return [(k.removeprefix("logppl/replay:"), v) for k, v in sorted(drift.items())]


def _against(fitness: dict) -> dict | None:
    """The release this one replaces, on this release's data (a stream release), or else the
    previous release of the run, with its value of each objective (None: not measured)."""
    same, prev = fitness.get("current_release_same_data"), fitness.get("previous_release")
    if same:
        olds = [same["objectives"].get(n) for n in fitness["objectives"]]
        title, column = f"Against the release it replaces ({same['name']}), on the same data", "replaced"
    elif prev:
        olds = [prev["objectives"].get(n, {}).get("value") for n in fitness["objectives"]]
        title, column = f"Against the previous release ({prev['name']}, data `{prev['data_version']}`)", "previous"
    else:
        return None
    rows = [(n, old, o["value"]) for old, (n, o) in zip(olds, fitness["objectives"].items())]
    return {"title": title, "column": column, "rows": rows}


def _margins(fitness: dict) -> dict | None:
    """The recorded margins over the baselines, and which text each split they are on covers."""
    rows = []
    for key, m in (fitness.get("margins") or {}).items():
        if not m:
            continue
        what, split = key.split("/")
        against = fitness["release"]["best_baseline"] if "baseline" in what else "uniform average"
        rows.append({"what": what.replace("_", " "), "against": against, "split": split, "m": m})
    if not rows:
        return None
    splits = dict.fromkeys(r["split"] for r in rows)
    return {"rows": rows, "covers": [(split, SPLIT_TEXT.get(split, ANY_SPLIT)) for split in splits]}


def _comparison(fitness: dict, cfg: ExperimentConfig) -> dict | None:
    """Every compared model's log-perplexity per evaluation set on the most held-out split
    recorded (test, else selection, else valid); rows that failed or were not measured are left out."""
    comp = fitness.get("comparison")
    if not comp:
        return None
    coll = next((c for c in ("test", "selection", "valid") if any(c in v for v in comp.values())), "valid")
    sets = fitness.get("comparison_sets") or list(cfg.eval.sets)
    rows = []
    for label, colls in comp.items():
        m = colls.get(coll, {})
        if "error" not in m and m:
            values = [m[f"logppl/{s}"] for s in sets]
            rows.append((label, values, float(np.mean(values))))
    return {"split": coll, "text": SPLIT_TEXT.get(coll, ANY_SPLIT), "sets": sets, "rows": rows}
