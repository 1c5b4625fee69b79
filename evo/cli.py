"""``evo`` command line: a thin shell over the Python API (every verb calls one function)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from evo.core.errors import EvoError

# exit codes of `evo run` / `evo resume` (and every verb for the first three)
EXIT_OK = 0          # finished (a stream run: every data version present was processed)
EXIT_ERROR = 2       # bad input or environment: one line on stderr naming the file, field or path
EXIT_STOPPED = 3     # stopped by SIGINT/SIGTERM after checkpointing: `evo resume RUN` continues
EXIT_ALL_FAILED = 4  # no candidate evaluated successfully; stderr names the first failure
EXIT_NO_DATA = 5     # a stream run found no usable data version
EXIT_ABORTED = 130   # a second Ctrl-C: aborted at once (the last checkpoint still resumes)
EXIT_CODES = {"finished": EXIT_OK, "stopped": EXIT_STOPPED, "all_failed": EXIT_ALL_FAILED, "no_data": EXIT_NO_DATA}
EXIT_HELP = """exit codes:
  0    finished (a stream run: every data version present was processed)
  2    bad input or environment (one line on stderr names the file, field or path)
  3    stopped by SIGINT/SIGTERM after checkpointing; `evo resume RUN_DIR` continues it
  4    every candidate failed (stderr gives the first failure)
  5    a stream run found no usable data version
  130  aborted by a second Ctrl-C (the last checkpoint still resumes)"""


def _cmd_run(args) -> int:
    from dataclasses import replace

    from evo.loop.experiment import load_config
    from evo.loop.driver import run

    config = args.config
    if args.sync:  # generation-synchronous search, recorded in the run's config (resume keeps it)
        config = load_config(args.config)
        config = replace(config, optimizer=replace(config.optimizer, asynchronous=False))
    return _print_best(run(config, args.run_dir, quiet=args.quiet, follow=args.follow))


def _cmd_resume(args) -> int:
    from evo.loop.driver import resume

    return _print_best(resume(args.run_dir, quiet=args.quiet, follow=args.follow))


def _print_best(result) -> int:
    """Print how the run ended; return its exit code."""
    code = EXIT_CODES[result.outcome]
    if result.outcome in ("all_failed", "no_data"):
        what = "every candidate failed; first failure" if result.outcome == "all_failed" else "no data"
        print(f"evo: error: {what}: {result.reason}", file=sys.stderr)
        return code
    if result.versions:
        released = ", ".join(result.releases) or "none"
        print(f"data versions processed: {len(result.versions)}; releases: {released}")
        if result.release_dir:
            print(f"current release: {result.release_dir} (a stream run writes its releases itself)")
        return code
    if result.best_recipe is None:
        return code
    if result.outcome == "stopped":
        return code  # the loop printed how to continue
    values = ", ".join(f"{n}={v:.4f}" for n, v in zip(result.objectives, result.best_values))
    sel = result.selection
    if sel and sel.get("release"):
        print(f"search's best: {values} (search blocks, adjusted)")
        chosen = sel.get("release_values", {})
        shown = "; ".join(f"{split}: " + ", ".join(f"{n}={v:.4f}" for n, v in vals.items()) for split, vals in chosen.items())
        print(f"release: {sel['release']} ({shown}); export with `evo export {result.run_dir}`")
        return code
    print(f"best: {values}  (recipe {result.best_recipe.key()}; export with `evo export {result.run_dir}`)")
    return code


def _cmd_status(args) -> None:
    from evo.artifacts.status import status_table

    print(status_table(args.run_dir, top=args.top))


def _cmd_export(args) -> None:
    from evo.artifacts.release import export

    print(export(args.run_dir, args.out, name=args.name, lora=args.lora, candidate=args.candidate))


def _cmd_merge(args) -> None:
    from evo.merge import MergeConfig, merge_to_dir

    config = MergeConfig.from_yaml(args.config)
    base = Path(args.config).resolve().parent

    def resolve(name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else (base / p if (base / p).exists() else p)

    print(merge_to_dir(config, args.out, resolve=resolve, seed=args.seed))


def _cmd_verify(args) -> None:
    import json
    from pathlib import Path

    from evo.artifacts.verify import verify
    from evo.data.draws import SPLIT_TEXT

    values = verify(args.release, tolerance=args.tolerance)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in values.items())
    split = json.loads((Path(args.release) / "fitness.json").read_text(encoding="utf-8")).get("measured_on")
    where = f" on the {split} split: {SPLIT_TEXT[split]}" if split in SPLIT_TEXT else ""
    print(f"{args.release}: OK (manifest matches; re-measured {shown}{where})")


def _cmd_plan(args) -> int:
    from evo.loop.experiment import load_config
    from evo.cluster.memory import plan_for, suggestions

    cfg = load_config(args.config)
    plan = plan_for(cfg)
    print(plan.table())
    problem = plan.problem()
    if problem is None:
        print("fits")
        return EXIT_OK
    print(f"does not fit: {problem}{suggestions(cfg)}")
    return EXIT_ERROR


def _cmd_report(args) -> None:
    from evo.artifacts.report import report

    print(report(args.run_dir, args.out))


LIBRARIES = ("torch", "transformers", "peft", "ray", "deap", "safetensors", "numpy")


def version_text(verbose: bool = False) -> str:
    """``evo X.Y.Z``; verbose: the Python and library versions a bug report needs, read from the
    installed distributions' metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    text = f"evo {of('evo')}"
    if verbose:
        import platform

        text += "\n" + "\n".join([f"python {platform.python_version()} ({platform.machine()})",
                                  *[f"{lib} {of(lib)}" for lib in LIBRARIES]])
    return text


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evo", description="Evolutionary model merging on Ray")
    p.add_argument("--version", action="store_true",
                   help="print evo's version (with --verbose: Python's and the libraries' too) and exit")
    p.add_argument("--verbose", action="store_true", help="with --version: the libraries' versions too")
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("run", help="start an experiment", epilog=EXIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("config", help="experiment YAML")
    r.add_argument("--run-dir", required=True, help="new run directory")
    r.add_argument("--quiet", action="store_true", help="no progress bars or tables (for logs)")
    r.add_argument("--follow", action="store_true",
                   help="stream runs: keep waiting for new shards and releasing until SIGINT/SIGTERM")
    r.add_argument("--sync", action="store_true",
                   help="generation-synchronous search (optimizer.async: false): bit-for-bit reproducible, "
                        "evaluators wait for each generation's slowest candidate")
    r.set_defaults(fn=_cmd_run)

    r = sub.add_parser("resume", help="continue a stopped or killed run", epilog=EXIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
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
    r.add_argument("--candidate", choices=("release", "best-evolved"), default="release",
                   help="the run's release (default), or the best evolved recipe on the selection split "
                        "even where a simple baseline was released")
    r.set_defaults(fn=_cmd_export)

    r = sub.add_parser("merge", help="run a mergekit-style YAML merge")
    r.add_argument("config")
    r.add_argument("out")
    r.add_argument("--seed", type=int, default=0, help="seed for random methods (DARE, DELLA)")
    r.set_defaults(fn=_cmd_merge)

    r = sub.add_parser("plan", help="print a config's memory plan (per node and per GPU) without running it; "
                                    "exit 2 if it does not fit")
    r.add_argument("config", help="experiment YAML")
    r.set_defaults(fn=_cmd_plan)

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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(version_text(args.verbose))
        return EXIT_OK
    if args.command is None:
        parser.error("a command is required (evo --help lists them)")
    previous = None
    if args.command in ("run", "resume") and threading.current_thread() is threading.main_thread():
        # SIGTERM before the loop installs its own handler (loading sources, starting Ray and the
        # evaluators) ends the start-up the way Ctrl-C does: cleanly, with nothing half-made
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = args.fn(args) or EXIT_OK
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except EvoError as exc:
        print(f"evo: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `evo status RUN | head -3`: the reader left; end quietly like other tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except OSError as exc:  # a full disk, a read-only or vanished folder: nothing was half-written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"evo: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("evo: interrupted", file=sys.stderr)
        return EXIT_ABORTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
