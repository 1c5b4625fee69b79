"""A data pipeline's last step: drop finished shards into the folder `evo run --follow` watches.

Each shard is written as ``NAME.part`` and renamed, the convention ``evo.data.stream`` relies on
(the loop never reads half a shard). Shards go in name order, one at a time, either every
``--interval`` seconds (a pipeline on a clock) or, with ``--run-dir``, once the run is up and then
as soon as it has finished the previous data version (its checkpoint's ``stream.history`` grew): the way a
benchmark measures each version's wall time and CPU time without a queue of waiting shards.

    python experiments/stream_producer.py SHARDS_DIR FOLLOWED_DIR --run-dir runs/live --log drops.jsonl

``--log`` appends one JSON line per shard: when it was dropped and when the run finished it,
with the machine's CPU-seconds (all processes: the driver, Ray and its evaluators) at both.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def cpu_seconds() -> float:
    """CPU time of the whole machine so far (user + system + nice), in seconds: on a machine that
    runs nothing else, what a run's processes (driver, raylet, evaluators) spent together."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0)


def versions_done(run_dir: Path) -> int:
    """Data versions the run has finished (released or not), from its checkpoint."""
    try:
        ckpt = json.loads((run_dir / "checkpoint.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not written yet, or being replaced this instant
        return 0
    return len((ckpt.get("stream") or {}).get("history", []))


def run_ready(run_dir: Path) -> bool:
    """The run's evaluators are up (its ``ray_started`` event is written)."""
    try:
        return any('"ray_started"' in line for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines())
    except OSError:
        return False


def drop(shard: Path, folder: Path) -> Path:
    """Copy ``shard`` into ``folder`` under a temporary name, then rename it into place."""
    tmp = folder / f".{shard.name}.part"
    shutil.copyfile(shard, tmp)
    target = folder / shard.name
    tmp.rename(target)
    return target


def produce(shards: list[Path], folder: Path, *, run_dir: Path | None = None, interval: float = 0.0,
            log: Path | None = None, timeout: float = 24 * 3600.0, alive=lambda: True) -> list[dict]:
    """Drop ``shards`` one by one; with ``run_dir`` wait until the run finished each before the
    next. ``alive()`` False (e.g. the run's process exited) stops the wait with an error."""
    folder.mkdir(parents=True, exist_ok=True)
    if run_dir is not None:  # the start-up (Ray, evaluators, sources) is paid once, not per version
        _wait(lambda: run_ready(run_dir), alive, timeout, f"{run_dir}: the run did not start")
    rows = []
    for k, shard in enumerate(shards):
        row = {"shard": shard.name, "dropped": time.time(), "cpu_dropped": cpu_seconds()}
        drop(shard, folder)
        if run_dir is not None:
            _wait(lambda k=k: versions_done(run_dir) > k, alive, timeout, f"{run_dir}: version {k} ({shard.name}) not finished")
            row.update(finished=time.time(), cpu_finished=cpu_seconds())
            row.update(seconds=row["finished"] - row["dropped"], cpu_seconds=row["cpu_finished"] - row["cpu_dropped"])
        elif interval and k + 1 < len(shards):
            time.sleep(interval)
        rows.append(row)
        if log is not None:
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def _wait(done, alive, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not done():
        if not alive():
            raise RuntimeError(f"{what}: the run's process exited")
        if time.time() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f}s")
        time.sleep(0.2)  # polling files the run writes at each step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="folder of finished shards (*.jsonl or *.txt), dropped in name order")
    p.add_argument("folder", help="the folder the run follows (stream.folder)")
    p.add_argument("--run-dir", help="wait until this run has finished each version before the next shard")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between shards (without --run-dir)")
    p.add_argument("--log", help="append one JSON line per shard (times and CPU-seconds)")
    args = p.parse_args(argv)
    shards = sorted(x for x in Path(args.shards).iterdir() if x.is_file() and not x.name.startswith("."))
    if not shards:
        print(f"{args.shards}: no shard to drop", file=sys.stderr)
        return 2
    for row in produce(shards, Path(args.folder), run_dir=Path(args.run_dir) if args.run_dir else None,
                       interval=args.interval, log=Path(args.log) if args.log else None):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
