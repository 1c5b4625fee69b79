"""``evo status``: the population table of a run, read from its run store."""
from __future__ import annotations

from evo.artifacts.lock import holder
from evo.artifacts.store import RunStore


def status_table(run_dir, top: int = 10) -> str:
    store = RunStore.open(run_dir)
    ckpt = store.load_checkpoint()
    candidates = store.candidates()
    live = holder(store.root)
    lines = [f"run {store.root}" + (f"  (running: {live})" if live else "")]
    if not ckpt:
        lines.append(f"no complete generation yet ({len(candidates)} candidates evaluated)")
        return "\n".join(lines)
    names = [o["name"] for o in ckpt.objectives]
    failed = sum(c["status"] == "failed" for c in candidates)
    rejected = sum(c["status"] == "rejected" for c in candidates)  # a verdict, not a failure
    stream = ckpt.stream
    of = "" if stream else f"/{ckpt.generations}"
    lines.append(
        f"generation {ckpt.generation}{of}  data {ckpt.data_version}  "
        f"candidates {len(candidates)} (failed {failed}, stopped early {rejected}, "
        f"cached {sum(bool(c.get('cached')) for c in candidates)})"
    )
    if stream:
        lines.append(f"stream: {len(stream['history'])} version(s) done, now {stream['version']} ({stream['phase']}), "
                     f"current release {stream['release'] or 'none'}")
        for h in stream["history"]:
            lines.append(f"  {h['version']:<24} {version_summary(h)}")
    latest = {}
    for c in candidates:  # the newest record of each recipe key
        latest[c["key"]] = c
    pop = [e for e in ckpt.optimizer["population"]]
    lines.append("")
    lines.append(f"{'rank':>4}  " + "  ".join(f"{n:>14}" for n in names) + "  genome (first 6 genes)")
    for rank, e in enumerate(pop[:top], 1):
        vals = "  ".join(f"{v:>14.4f}" for v in e["values"]) if e["values"] else "failed".rjust(14)
        genes = " ".join(f"{g:.2f}" for g in e["genome"][:6])
        lines.append(f"{rank:>4}  {vals}  {genes}")
    if ckpt.best:
        lines.append("")
        lines.append("best: " + ", ".join(f"{n}={v:.4f}" for n, v in zip(names, ckpt.best["values"])))
    return "\n".join(lines)


def version_summary(h: dict) -> str:
    """One stream version in a line: the decision, the gain on the newest data over the release
    current before it, the worst retention drift since the anchors, and where the time went."""
    parts = [h["decision"]]
    if h.get("gain") is not None:
        parts.append(f"gain {h['gain']:+.4f}")
    if h.get("drift"):
        key, worst = max(h["drift"].items(), key=lambda kv: kv[1])
        parts.append(f"worst drift {worst:+.4f} ({key.removeprefix('logppl/replay:')})")
    if h.get("seconds"):
        total = sum(h["seconds"].values())
        parts.append(f"{total:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in h["seconds"].items()) + ")")
    return "; ".join(parts)
