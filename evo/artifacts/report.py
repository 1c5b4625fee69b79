"""``evo report RUN_DIR``: one self-contained HTML page (plots embedded, opens offline) plus
the PNGs, read entirely from the run store.

Sections: fitness per generation, Pareto front (several objectives), gene distributions over
generations, lineage of the best candidate, comparison with baselines, failures, data versions.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evo.core.config import ExperimentConfig  # noqa: E402
from evo.core.errors import EvoError  # noqa: E402
from evo.search.space import SearchSpace  # noqa: E402
from evo.artifacts.checkpoint import Checkpoint  # noqa: E402
from evo.artifacts.store import RunStore  # noqa: E402
from evo.core.fs import atomic_write_text
from evo.artifacts.status import version_summary  # noqa: E402


def report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN_DIR/report/index.html`` (or ``out``) and its PNGs; return the HTML path."""
    store = RunStore.open(run_dir)
    ckpt = store.load_checkpoint()
    if not ckpt:
        raise EvoError(f"{store.root}: no complete generation to report yet")
    cfg = ExperimentConfig.from_dict(store.config(), source=str(store.root / RunStore.CONFIG))
    cands = store.candidates()
    out_dir = Path(out) if out else store.root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [o["name"] for o in ckpt.objectives]
    goals = [o["goal"] for o in ckpt.objectives]
    # the genome's models as the run recorded them (a stream run adds its current release)
    models = ckpt.space.get("models") or list(cfg.models.sources)
    from evo.zoo.gguf import as_model_dir

    space = SearchSpace.load(cfg.search_space, models, "base", base_dir=as_model_dir(cfg.models.base))

    figures = {
        "fitness": _plot_fitness(ckpt.logbook, names),
        "genes": _plot_genes(cands, space),
        "lineage": _plot_lineage(cands, ckpt, names),
    }
    if len(names) >= 2:
        figures["pareto"] = _plot_pareto(cands, ckpt, names, goals)
    images = {}
    for key, fig in figures.items():
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        (out_dir / f"{key}.png").write_bytes(buf.getvalue())
        images[key] = base64.b64encode(buf.getvalue()).decode()
    page = _html(cfg, ckpt, cands, store, images, names)
    target = out_dir / "index.html"
    atomic_write_text(target, page)
    return target


# ------------------------------------------------------------------------------------ plots
def _plot_fitness(logbook: list[dict], names: list[str]):
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.6), squeeze=False)
    gens = [row["gen"] for row in logbook]
    for j, (ax, name) in enumerate(zip(axes[0], names)):
        for stat, style in (("min", "-o"), ("mean", "--"), ("max", ":")):
            ys = [row.get(f"{name}/{stat}") for row in logbook]
            ax.plot(gens, [np.nan if y is None else y for y in ys], style, label=f"generation {stat}")
        best = [row["best"][j] if row.get("best") else np.nan for row in logbook]
        ax.plot(gens, best, "-", lw=2.5, color="black", label="best so far")
        ax.set_xlabel("generation")
        ax.set_ylabel(name)
        ax.set_title(f"{name} per generation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_genes(cands: list[dict], space: SearchSpace, max_genes: int = 24):
    labels = space.labels[:max_genes]
    if not labels or not cands:
        return None
    by_gen = defaultdict(list)
    for c in cands:
        if len(c.get("genome") or []) == space.dim:
            by_gen[c["generation"]].append(space.values(c["genome"]))
    gens = sorted(by_gen)
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.4 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        numeric = all(isinstance(v[label], (int, float)) and not isinstance(v[label], bool) for g in gens for v in by_gen[g])
        if numeric:
            data = [[v[label] for v in by_gen[g]] for g in gens]
            ax.boxplot(data, positions=gens, widths=0.6, showfliers=False)
            ax.plot(gens, [np.median(d) for d in data], color="tab:blue", lw=1)
        else:
            choices = sorted({str(v[label]) for g in gens for v in by_gen[g]})
            for ch in choices:
                share = [np.mean([str(v[label]) == ch for v in by_gen[g]]) for g in gens]
                ax.plot(gens, share, label=ch)
            ax.legend(fontsize=6)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle("gene values per generation (evaluated candidates)")
    fig.tight_layout()
    return fig


def lineage(cands: list[dict], best_id: str | None) -> list[dict]:
    """The best candidate and its ancestors back to generation 0 (first record per name)."""
    by_name = {}
    for c in cands:
        by_name.setdefault(c["candidate"], c)
    out, todo, seen = [], [best_id] if best_id else [], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        out.append(by_name[name])
        todo.extend(by_name[name].get("parents") or [])
    return sorted(out, key=lambda c: (c["generation"], c["candidate"]))


def _best_id(ckpt: Checkpoint) -> str | None:
    best = ckpt.best or {}
    return best.get("id")


def _plot_lineage(cands, ckpt, names):
    tree = lineage(cands, _best_id(ckpt))
    if not tree:
        return None
    pos = {c["candidate"]: (c["generation"], c["values"][0] if c.get("values") else np.nan) for c in tree}
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ok = [c for c in cands if c.get("values")]
    ax.scatter([c["generation"] for c in ok], [c["values"][0] for c in ok], s=8, color="lightgray", label="all candidates")
    for c in tree:
        for p in c.get("parents") or []:
            if p in pos:
                ax.plot([pos[p][0], pos[c["candidate"]][0]], [pos[p][1], pos[c["candidate"]][1]], color="tab:blue", lw=1)
    ax.scatter([p[0] for p in pos.values()], [p[1] for p in pos.values()], color="tab:blue", zorder=3, label="ancestors")
    best = pos.get(_best_id(ckpt))
    if best:
        ax.scatter([best[0]], [best[1]], color="tab:red", s=60, zorder=4, label="best")
    ax.set_xlabel("generation")
    ax.set_ylabel(names[0])
    ax.set_title("lineage of the best candidate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _plot_pareto(cands, ckpt, names, goals):
    ok = [c["values"] for c in cands if c.get("values")]
    if not ok:
        return None
    pts = np.array(ok)
    front = [e["values"] for e in ckpt.optimizer.get("front", []) if e.get("values")]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(pts[:, 0], pts[:, 1], s=8, color="lightgray", label="candidates")
    if front:
        f = np.array(sorted(front))
        ax.plot(f[:, 0], f[:, 1], "-o", color="tab:red", label="Pareto front")
    ax.set_xlabel(f"{names[0]} ({goals[0]})")
    ax.set_ylabel(f"{names[1]} ({goals[1]})")
    ax.set_title("objectives of every candidate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


# ------------------------------------------------------------------------------------- html
def _share(fraction) -> str:
    return f"{fraction:.0%}" if isinstance(fraction, (int, float)) else "-"


def _first_value(cand: dict) -> str:
    values = cand.get("values") or []
    return f"{values[0]:.4f}" if values and values[0] is not None else "-"


def _html(cfg, ckpt, cands, store, images, names) -> str:
    esc = html.escape
    failed = [c for c in cands if c["status"] not in ("ok", "rejected")]
    rejected = [c for c in cands if c["status"] == "rejected"]
    versions = sorted({c.get("data_version") for c in cands if c.get("data_version")})
    best = ckpt.best or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>evo report: {esc(cfg.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}img{max-width:100%}code{background:#f6f6f6}</style></head><body>",
        f"<h1>evo report: {esc(cfg.name)}</h1>",
        f"<p>run <code>{esc(str(store.root))}</code> &middot; generation {ckpt.generation}"
        f"{'' if ckpt.stream else ' of ' + str(ckpt.generations)} &middot; {len(cands)} candidates ({len(failed)} failed, {len(rejected)} stopped early by rejection) &middot; optimizer "
        f"<code>{esc(cfg.optimizer.name)}</code> &middot; search space <code>{esc(Path(cfg.search_space).name)}</code></p>",
    ]
    if best:
        parts.append("<h2>Best candidate</h2><table><tr><th>objective</th><th>value</th></tr>")
        parts += [f"<tr><td>{esc(n)}</td><td>{v:.4f}</td></tr>" for n, v in zip(names, best["values"])]
        parts.append(f"</table><p>candidate <code>{esc(str(best.get('id')))}</code></p>")
    for key, title in (("fitness", "Fitness per generation"), ("pareto", "Pareto front"),
                       ("genes", "Gene distributions"), ("lineage", "Lineage of the best")):
        if key in images:
            parts.append(f"<h2>{title}</h2><img alt='{key}' src='data:image/png;base64,{images[key]}'>")
    comp = ckpt.comparison
    if comp:
        coll = next((c for c in ("test", "selection", "valid") if any(c in v for v in comp.values())), "valid")
        sets = list(cfg.eval.sets)
        parts.append(f"<h2>Comparison ({coll} split, log-perplexity)</h2><table><tr><th>model</th>"
                     + "".join(f"<th>{esc(s)}</th>" for s in sets) + "<th>mean</th></tr>")
        for label, colls in comp.items():
            m = colls.get(coll, {})
            if m and "error" not in m:
                parts.append(f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{m[f'logppl/{s}']:.4f}</td>" for s in sets)
                             + f"<td>{m['mean']:.4f}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Failures</h2>")
    if failed:
        parts.append("<table><tr><th>candidate</th><th>status</th><th>error</th></tr>")
        parts += [f"<tr><td>{esc(c['candidate'])}</td><td>{esc(c['status'])}</td><td style='text-align:left'>"
                  f"{esc(str(c.get('error')))}</td></tr>" for c in failed[:50]]
        parts.append("</table>")
    else:
        parts.append("<p>none</p>")
    parts.append("<h2>Stopped early by rejection</h2>")
    if rejected:
        parts.append("<p>Not failures: each was clearly worse than the reference on the blocks it had scored, "
                     "so its remaining blocks were skipped.</p><table><tr><th>candidate</th><th>share of blocks scored</th>"
                     "<th>value when stopped</th></tr>")
        parts += [f"<tr><td>{esc(c['candidate'])}</td><td>{_share(c.get('evaluated_fraction'))}</td>"
                  f"<td>{esc(_first_value(c))}</td></tr>" for c in rejected[:50]]
        parts.append("</table>")
    else:
        parts.append("<p>none</p>")
    stream = ckpt.stream
    if stream:
        parts.append("<h2>Data versions and releases</h2><table><tr><th>version</th><th>shard</th>"
                     "<th>release after it</th><th>decision, gain, drift, time</th></tr>")
        parts += [f"<tr><td><code>{esc(h['version'])}</code></td><td>{esc(str(h['shard']))}</td>"
                  f"<td>{esc(str(h['release'] or '-'))}</td><td style='text-align:left'>{esc(version_summary(h))}</td></tr>"
                  for h in stream["history"]]
        parts.append("</table>")
    parts.append("<h2>Data versions</h2><ul>" + "".join(f"<li><code>{esc(v)}</code></li>" for v in versions) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
