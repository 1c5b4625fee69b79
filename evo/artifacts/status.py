"""``evo status``: the population table of a run, read from its run store."""
from __future__ import annotations

from evo.artifacts.lock import holder
from evo.artifacts.store import RunStore
from evo.core.records import CandidateRecord


def status_table(run_dir, top: int = 10) -> str:
    store = RunStore.open(run_dir)
    ckpt = store.load_checkpoint()
    raw = store.candidates()
    candidates = [CandidateRecord.from_dict(c) for c in raw]
    live = holder(store.root)
    lines = [f"run {store.root}" + (f"  (running: {live})" if live else "")]
    events = store.events()
    split = next((e for e in reversed(events) if e["event"] == "time_split"), None)
    so_far = live_split(events, raw) if live else None
    if so_far is not None:
        lines.append("this driver call so far: " + so_far)
    elif split is not None:
        lines.append("last driver call: " + format_time_split(split))
    if not ckpt:
        lines.append(f"no complete generation yet ({len(candidates)} candidates evaluated)")
        return "\n".join(lines)
    names = [o["name"] for o in ckpt.objectives]
    failed = sum(c.status == "failed" for c in candidates)
    rejected = sum(c.status == "rejected" for c in candidates)  # a verdict, not a failure
    stream = ckpt.stream
    of = "" if stream else f"/{ckpt.generations}"
    lines.append(
        f"generation {ckpt.generation}{of}  data {ckpt.data_version}  "
        f"candidates {len(candidates)} (failed {failed}, stopped early {rejected}, "
        f"cached {sum(c.cached for c in candidates)})"
    )
    if stream:
        lines.append(f"stream: {len(stream['history'])} version(s) done, now {stream['version']} ({stream['phase']}), "
                     f"current release {stream['release'] or 'none'}")
        for h in stream["history"]:
            lines.append(f"  {h['version']:<24} {version_summary(h)}")
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


# the loop's steps (evo.loop.driver.Loop.timed) as a user reads them
STEP_NAMES = {"install": "data install", "reevaluate": "re-evaluation", "start": "start points", "evolve": "search"}


def time_split(seconds: dict, wall: float, results: list[dict], seq_len: int, evaluators: int,
               release_step: str = "release") -> dict:
    """Where one driver call's wall time went: each loop step's seconds in this call, the rest
    (Ray and evaluator start-up, source loading, shut-down) as "start-up and other", the
    evaluators' busy fraction (time a candidate was out to each, over the wall time) and the
    tokens scored per busy evaluator-second."""
    names = {**STEP_NAMES, "release": release_step}
    steps = {names.get(k, k): round(v, 2) for k, v in seconds.items() if v > 0.005}
    steps["start-up and other"] = round(max(wall - sum(seconds.values()), 0.0), 2)
    busy: dict[int, float] = {}
    tokens: dict[int, int] = {}
    for r in results:
        d = r["dispatch"]
        busy[d["evaluator"]] = busy.get(d["evaluator"], 0.0) + max(d["end"] - d["start"], 0.0)
        scored = sum(len(v) for v in (r.get("block_nlls") or {}).values())
        tokens[d["evaluator"]] = tokens.get(d["evaluator"], 0) + scored * seq_len
    per = {str(a): {"busy": round(busy[a] / wall, 3) if wall > 0 else None,
                    "tokens_per_s": round(tokens.get(a, 0) / busy[a], 1) if busy[a] > 0 else None}
           for a in sorted(busy)}
    total_busy = sum(busy.values())
    return {"wall_s": round(wall, 2), "steps_s": steps, "evaluators": evaluators, "per_evaluator": per,
            # every evaluator that took work counts (the pool may hold fewer actors by the end: one lost)
            "busy": round(total_busy / (wall * max(evaluators, len(busy), 1)), 3) if wall > 0 else None,
            "tokens_per_s": round(sum(tokens.values()) / total_busy, 1) if total_busy > 0 else None}


def live_split(events: list[dict], candidates: list[dict], now: float | None = None) -> str | None:
    """A running driver's split so far: the seconds since its Ray started, how many went to
    scoring on each evaluator (candidates dispatched since then), the candidates finished; None
    when the newest call already wrote its time split (it has ended) or Ray has not started."""
    import time

    start = next((i for i in range(len(events) - 1, -1, -1) if events[i]["event"] == "ray_started"), None)
    if start is None or any(e["event"] == "time_split" for e in events[start:]):
        return None
    t0 = events[start]["time"]
    wall = (time.time() if now is None else now) - t0
    busy: dict[int, float] = {}
    done = 0
    for c in candidates:
        d = c.get("dispatch") or {}
        if d.get("start", 0) >= t0 and not c.get("cached"):
            busy[d["evaluator"]] = busy.get(d["evaluator"], 0.0) + max(d["end"] - d["start"], 0.0)
            done += 1
    n = max(int(events[start].get("evaluators") or 0), len(busy), 1)
    line = f"{wall:.0f} s since Ray started, {done} candidates scored"
    if busy and wall > 0:
        each = ", ".join(f"{a}: {b / wall:.0%}" for a, b in sorted(busy.items()))
        line += f"; evaluators busy {sum(busy.values()) / (wall * n):.0%} ({each})"
    return line


def format_time_split(t: dict) -> str:
    """One line: ``time 52.3 s: start points 4.1 s, search 31.2 s, ...; evaluators busy 87% ...``."""
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in t["steps_s"].items())
    line = f"time {t['wall_s']:.1f} s: {steps or 'no step ran'}"
    if t.get("busy") is not None:
        each = ", ".join(f"{a}: {v['busy']:.0%}" for a, v in t["per_evaluator"].items() if v["busy"] is not None)
        line += f"; evaluators busy {t['busy']:.0%} ({each})"
    if t.get("tokens_per_s"):
        line += f"; {t['tokens_per_s']:,.0f} tokens scored per busy evaluator-second"
    return line
