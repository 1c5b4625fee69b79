"""A shifted test split for a zoo: documents of the same domains that the zoo never drew from.

    python experiments/make_shifted.py --zoo zoo            # writes zoo/shifted/<domain>.jsonl

A zoo takes the first ``max_chars`` characters of each domain's text in the corpus's fixed order
(``evo.data.corpus``: Bible chapters in canonical order, code files in a hash order) and splits
those documents into train/valid/test by a hash of their content. Its test split is therefore
drawn from the same documents, books and files as the evaluation sets the search and the
selection read. This script takes the *next* ``--chars`` characters of each domain instead: later
books of the same translation, other modules of the same standard library. It checks that no
shifted document equals a zoo document, and records what it took in ``shifted/shifted.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True)
    p.add_argument("--chars", type=int, default=200_000, help="characters of shifted text per domain")
    args = p.parse_args(argv)
    from evo.core.fs import atomic_write_text
    from evo.data import corpus
    from evo.data.text import read_texts

    zoo = Path(args.zoo)
    manifest = json.loads((zoo / "zoo.json").read_text())
    settings = manifest["settings"]
    preset = settings["preset"]
    max_chars, doc_chars = preset["max_chars"], preset["doc_chars"]
    out = zoo / "shifted"
    out.mkdir(exist_ok=True)
    record = {"zoo_max_chars": max_chars, "doc_chars": doc_chars, "domains": {}}
    for name in settings["domains"]:
        seen = {hashlib.sha256(t.encode()).hexdigest() for f in (zoo / "data" / name).glob("*.jsonl") for t in read_texts(f)}
        used = corpus.load_domain(name, max_chars=max_chars, doc_chars=doc_chars)
        more = corpus.load_domain(name, max_chars=max_chars + args.chars, doc_chars=doc_chars)
        if more[: len(used)] != used:
            print(f"make_shifted: domain {name}: the corpus order is not stable", file=sys.stderr)
            return 1
        shifted = [d for d in more[len(used):] if hashlib.sha256(d.encode()).hexdigest() not in seen]
        if not shifted:
            print(f"make_shifted: domain {name}: no text beyond the zoo's {max_chars} characters", file=sys.stderr)
            return 1
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in shifted))
        record["domains"][name] = {"documents": len(shifted), "chars": sum(map(len, shifted)),
                                   "zoo_documents": len(used), "first_index": len(used),
                                   "dropped_as_duplicates": len(more) - len(used) - len(shifted),
                                   "starts_with": shifted[0][:80]}
        print(f"{name}: {len(shifted)} documents, {record['domains'][name]['chars']} chars after the zoo's "
              f"{len(used)} documents: {shifted[0][:60]!r}")
    atomic_write_text(out / "shifted.json", json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
