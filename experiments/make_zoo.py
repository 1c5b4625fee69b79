"""Build the benchmark model zoo: a small Llama base plus one specialist per text domain.

    python experiments/make_zoo.py --out zoo                       # tiny zoo on en, de, code
    python experiments/make_zoo.py --out zoo_micro --size micro --domains code,c,doc

Prints the test-split perplexity table (rows = models, columns = domains + mean; the best
value in each column is bold). Rerunning with the same settings reuses the zoo.
"""
from __future__ import annotations

import argparse
import sys
import time

import _common  # noqa: F401  (the set-up: this checkout's evo first on sys.path)

import torch

from evo.core.errors import EvoError
from evo.data.corpus import DOMAINS
from evo.zoo.build import PRESETS, build_zoo, markdown_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="zoo", help="zoo directory (default: zoo)")
    p.add_argument("--size", default="tiny", choices=sorted(PRESETS), help="size preset (default: tiny)")
    p.add_argument("--domains", default="en,de,code",
                   help=f"comma-separated domains from {', '.join(DOMAINS)} (default: en,de,code)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--base-steps", type=int, default=None, help="override the preset's base training steps")
    p.add_argument("--specialist-steps", type=int, default=None,
                   help="override the preset's specialist fine-tuning steps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    domains = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    started = time.time()
    try:
        zoo = build_zoo(args.out, domains=domains, size=args.size, seed=args.seed, base_steps=args.base_steps,
                        specialist_steps=args.specialist_steps, progress=not args.quiet)
    except EvoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = zoo.manifest
    print(f"zoo: {zoo.root}  size={m['settings']['size']}  params={m['num_params']:,}  "
          f"layers={zoo.num_layers}  build time={m['wall_time_s']:.0f}s  (this call {time.time() - started:.0f}s)")
    print(f"test-split perplexity ({m['eval']['seq_len']}-token blocks; bold = best per column):\n")
    print(markdown_table(zoo.table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
