"""``evo`` command line: a thin shell over the Python API (every verb calls one function)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from evo.errors import EvoError


def _cmd_run(args) -> None:
    from evo.runner import run

    result = run(args.config, args.run_dir, quiet=args.quiet, follow=args.follow)
    _print_best(result)


def _cmd_resume(args) -> None:
    from evo.runner import resume

    _print_best(resume(args.run_dir, quiet=args.quiet, follow=args.follow))


def _print_best(result) -> None:
    if result.versions:
        released = ", ".join(result.releases) or "none"
        print(f"data versions processed: {len(result.versions)}; releases: {released}")
    if result.best_recipe is None:
        print("no candidate evaluated successfully")
        return
    values = ", ".join(f"{n}={v:.4f}" for n, v in zip(result.objectives, result.best_values))
    sel = result.selection
    if sel and sel.get("release"):
        print(f"search's best: {values} (search blocks, adjusted)")
        chosen = sel.get("release_values", {})
        shown = "; ".join(f"{split}: " + ", ".join(f"{n}={v:.4f}" for n, v in vals.items()) for split, vals in chosen.items())
        print(f"release: {sel['release']} ({shown}); export with `evo export {result.run_dir}`")
        return
    print(f"best: {values}  (recipe {result.best_recipe.key()}; export with `evo export {result.run_dir}`)")


def _cmd_status(args) -> None:
    from evo.status import status_table

    print(status_table(args.run_dir, top=args.top))


def _cmd_export(args) -> None:
    from evo.release import export

    print(export(args.run_dir, args.out, name=args.name, lora=args.lora))


def _cmd_merge(args) -> None:
    from evo.merge import MergeConfig, merge_to_dir

    config = MergeConfig.from_yaml(args.config)
    base = Path(args.config).resolve().parent

    def resolve(name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else (base / p if (base / p).exists() else p)

    print(merge_to_dir(config, args.out, resolve=resolve, seed=args.seed))


def _cmd_verify(args) -> None:
    from evo.release import verify

    values = verify(args.release, tolerance=args.tolerance)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in values.items())
    print(f"{args.release}: OK (manifest matches; re-measured {shown})")


def _cmd_report(args) -> None:
    from evo.reporting import report

    print(report(args.run_dir, args.out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evo", description="Evolutionary model merging on Ray")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="start an experiment")
    r.add_argument("config", help="experiment YAML")
    r.add_argument("--run-dir", required=True, help="new run directory")
    r.add_argument("--quiet", action="store_true", help="no progress bars or tables (for logs)")
    r.add_argument("--follow", action="store_true",
                   help="stream runs: keep waiting for new shards and releasing until SIGINT/SIGTERM")
    r.set_defaults(fn=_cmd_run)

    r = sub.add_parser("resume", help="continue a stopped or killed run")
    r.add_argument("run_dir")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--follow", action="store_true", help="stream runs: keep following the shard folder")
    r.set_defaults(fn=_cmd_resume)

    r = sub.add_parser("status", help="print the population table of a run")
    r.add_argument("run_dir")
    r.add_argument("--top", type=int, default=10)
    r.set_defaults(fn=_cmd_status)

    r = sub.add_parser("export", help="export the fittest recipe as a release")
    r.add_argument("run_dir")
    r.add_argument("out", nargs="?", help="release directory (default RUN_DIR/releases/vNNNN)")
    r.add_argument("--name", help="release name under RUN_DIR/releases (instead of OUT)")
    r.add_argument("--lora", choices=("merged", "adapter"), default="merged",
                   help="fold a LoRA into the weights, or keep it as a PEFT adapter beside them")
    r.set_defaults(fn=_cmd_export)

    r = sub.add_parser("merge", help="run a mergekit-style YAML merge")
    r.add_argument("config")
    r.add_argument("out")
    r.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE, DELLA)")
    r.set_defaults(fn=_cmd_merge)

    r = sub.add_parser("report", help="write an HTML report (and PNGs) of a run")
    r.add_argument("run_dir")
    r.add_argument("--out", help="folder (default RUN_DIR/report)")
    r.set_defaults(fn=_cmd_report)

    r = sub.add_parser("verify", help="check a release: manifest, loading, recorded fitness")
    r.add_argument("release")
    r.add_argument("--tolerance", type=float, default=1e-3, help="allowed absolute difference per objective")
    r.set_defaults(fn=_cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except EvoError as exc:
        print(f"evo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
