"""Build the shipped task sets under tasks/ from text that installs with Python itself.

    python experiments/make_tasks.py [--out tasks] [--seed 0] [--items 300]

Deterministic for a given seed and Python version (the sources are the running Python's
standard library). Writes one folder per task set: a JSONL file and the YAML(s) that read it.

- python_next_line: Lib/test/**/*.py (the zoo never trains on test/), PSF-2.0.
- arithmetic: synthetic, generated here.
- prose_cloze: pydoc_data/topics.py, only documents the default zoo (seed 0, tiny/small
  presets) puts in its valid/test splits, so the zoo's models have not trained on them. PSF-2.0.
- capitals: Debian bsdgames quiz files when installed (BSD); skipped otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sysconfig
from pathlib import Path

import yaml

from _common import ROOT

from evo.data import corpus

QUIZ_DIR = Path("/usr/share/games/bsdgames/quiz")


def write_set(out: Path, name: str, records: list[dict], yamls: dict[str, dict]) -> None:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    for file_name, spec in yamls.items():
        text = yaml.safe_dump({"dataset_file": f"{name}.jsonl", **spec}, sort_keys=False, allow_unicode=True)
        (folder / file_name).write_text(text, encoding="utf-8")
    print(f"{folder}: {len(records)} items, {(folder / f'{name}.jsonl').stat().st_size // 1024} KB")


def _stable(path: Path, root: Path) -> str:
    return hashlib.sha1(path.relative_to(root).as_posix().encode()).hexdigest()


# --- python_next_line -------------------------------------------------------------------------

def _code_line(line: str) -> bool:
    s = line.strip()
    return 12 <= len(s) <= 70 and len(line) <= 80 and line.isascii() and not s.startswith(("#", '"', "'")) \
        and not s.endswith(('"""', "'''"))


def python_next_line(rng: random.Random, n: int, context_lines: int = 3) -> list[dict]:
    """Context: a few lines of a test module; choices: the true next line and three code lines
    from other modules, re-indented like the true one so indentation alone gives nothing away."""
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    files = sorted((p for p in root.rglob("*.py") if p.stat().st_size < 200_000), key=lambda p: _stable(p, root))
    sources = []
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (UnicodeDecodeError, OSError):
            continue
        sources.append((path.relative_to(root.parent).as_posix(), lines))
    pool = [(name, line.strip()) for name, lines in sources for line in lines if _code_line(line)]
    records = []
    for name, lines in sources:
        if len(records) == n:
            break
        spots = [i for i in range(context_lines, len(lines)) if _code_line(lines[i])
                 and all(lines[j].strip() and len(lines[j]) <= 80 and lines[j].isascii()
                         for j in range(i - context_lines, i))]
        if not spots:
            continue
        i = rng.choice(spots)
        gold = lines[i]
        indent = gold[: len(gold) - len(gold.lstrip())]
        options = {gold.strip()}
        while len(options) < 4:
            other, text = rng.choice(pool)
            if other != name:
                options.add(text)
        choices = [indent + s for s in sorted(options - {gold.strip()})]
        label = rng.randrange(4)
        choices.insert(label, gold)
        records.append({"context": "\n".join(lines[i - context_lines : i]) + "\n", "choices": choices,
                        "label": label, "source": f"{name}:{i + 1}"})
    return records


# --- arithmetic ---------------------------------------------------------------------------------

def arithmetic(rng: random.Random, n: int) -> list[dict]:
    records = []
    seen = set()
    while len(records) < n:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            answer = a * b
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if op == "-" and b > a:
                a, b = b, a
            answer = a + b if op == "+" else a - b
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        wrong = {answer + d for d in (-10, -2, -1, 1, 2, 10)} | {a + b, abs(a - b), a * b}
        wrong = sorted(w for w in wrong if w >= 0 and w != answer)
        choices = [str(w) for w in rng.sample(wrong, 3)]
        label = rng.randrange(4)
        choices.insert(label, str(answer))
        records.append({"question": f"What is {a} {op} {b}?", "answer": str(answer), "choices": choices,
                        "label": label})
    return records


# --- prose_cloze --------------------------------------------------------------------------------

_SENTENCE_OK = re.compile(r"[A-Za-z0-9 ,;:'\"’()\-._/]+\Z")
_WORD = re.compile(r"[a-z]{4,}\Z")


def _held_out_prose() -> list[str]:
    """Sentences of the topics documents the default zoo holds out (valid + test, seed 0)."""
    docs = corpus.load_domain("doc", doc_chars=corpus.DOC_CHARS)
    splits = corpus.split_documents(docs, seed=0)
    sentences = []
    for doc in splits["valid"] + splits["test"]:
        for para in re.split(r"\n\s*\n", doc):
            # Indented blocks are grammar or code; underlined lines are headings.
            if para.startswith("   ") or ">>>" in para or re.search(r"^[*=\-]{3,}", para, re.M):
                continue
            text = " ".join(line.strip() for line in para.split("\n")).lstrip("* ")
            text = re.sub(r"\*+([^*]+)\*+", r"\1", text)      # reST emphasis
            text = re.sub(r"\s*\[\d+\]", "", text)              # footnote marks
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                if 8 <= len(sentence.split()) <= 45 and sentence.endswith(".") and _SENTENCE_OK.match(sentence):
                    sentences.append(sentence)
    return list(dict.fromkeys(sentences))


def prose_cloze(rng: random.Random, n: int) -> list[dict]:
    """One word of a sentence blanked; choices are that word and three words of similar length
    from the same text, each followed by the rest of the sentence (a full cloze, not next-word).
    The held-out text has fewer sentences than items, so a sentence gives up to two items,
    blanking different words."""
    sentences = _held_out_prose()
    vocab = sorted({w for s in sentences for w in s.split() if _WORD.match(w)})
    rng.shuffle(sentences)
    records = []
    used: dict[str, set[int]] = {}
    for _ in range(2):
        for sentence in sentences:
            if len(records) == n:
                return records
            words = sentence.split(" ")
            spots = [i for i in range(3, len(words)) if _WORD.match(words[i]) and i not in used.get(sentence, ())]
            if not spots:
                continue
            i = rng.choice(spots)
            used.setdefault(sentence, set()).add(i)
            gold = words[i]
            near = [w for w in vocab if w != gold and abs(len(w) - len(gold)) <= 2]
            options = rng.sample(near, 3)
            label = rng.randrange(4)
            options.insert(label, gold)
            suffix = " ".join(words[i + 1:])
            records.append({"prefix": " ".join(words[:i]), "options": options,
                            "suffix": (" " + suffix) if suffix else "", "label": label})
    return records


# --- capitals (optional) ------------------------------------------------------------------------

def capitals(rng: random.Random, n: int, quiz_dir: Path = QUIZ_DIR) -> list[dict]:
    """Country -> capital from bsdgames' quiz files (``country:capital`` lines). In that format
    ``a|b`` are alternative answers, ``[a|b]`` alternative spellings inside a word and ``{x}``
    optional text; we keep the first alternative and the optional text."""
    def clean(text: str) -> str:
        text = re.sub(r"\[([^\]|]*)(\|[^\]]*)?\]", r"\1", text)  # Andorra la V[ell|iej]a -> Andorra la Vella
        return re.sub(r"[{}]", "", text.split("|")[0]).strip()

    pairs = []
    for name in ("africa", "america", "asia", "europe"):
        path = quiz_dir / name
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if ":" in line and not line.startswith("#"):
                    country, capital = line.split(":", 1)
                    if clean(country) and clean(capital):
                        pairs.append((clean(country), clean(capital)))
    pairs = sorted(set(pairs))
    caps = sorted({c for _, c in pairs})
    rng.shuffle(pairs)
    records = []
    for country, capital in pairs[:n]:
        choices = rng.sample([c for c in caps if c != capital], 3)
        label = rng.randrange(4)
        choices.insert(label, capital)
        records.append({"country": country, "choices": choices, "label": label})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "tasks"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--quiz-dir", default=str(QUIZ_DIR),
                        help="bsdgames quiz files (default: %(default)s; or from `apt-get download bsdgames` "
                             "and `dpkg-deb -x`)")
    args = parser.parse_args()
    quiz_dir = Path(args.quiz_dir)
    out = Path(args.out)
    meta = {"generator": "experiments/make_tasks.py", "seed": args.seed}

    write_set(out, "python_next_line", python_next_line(random.Random(args.seed), args.items), {
        "python_next_line.yaml": {
            "task": "python_next_line", "type": "multiple_choice",
            "doc_to_text": "{{context}}", "doc_to_choice": "choices", "doc_to_target": "label",
            "target_delimiter": "", "metric": "acc",
            "metadata": {**meta, "source": "CPython Lib/test/**/*.py", "licence": "PSF-2.0"}}})

    rows = arithmetic(random.Random(args.seed + 1), args.items)
    arith_meta = {**meta, "source": "synthetic", "licence": "generated; same licence as evo"}
    write_set(out, "arithmetic", rows, {
        "arithmetic_mc.yaml": {
            "task": "arithmetic_mc", "type": "multiple_choice",
            "doc_to_text": "{{question}} Answer:", "doc_to_choice": "choices", "doc_to_target": "label",
            "target_delimiter": " ", "metric": "acc", "metadata": arith_meta},
        "arithmetic_em.yaml": {
            "task": "arithmetic_em", "type": "exact_match",
            "doc_to_text": "{{question}} Answer:", "doc_to_target": "{{answer}}",
            "until": ["\n", "."], "max_gen_toks": 8, "regex": r"-?\d+", "metadata": arith_meta}})

    write_set(out, "prose_cloze", prose_cloze(random.Random(args.seed + 2), args.items), {
        "prose_cloze.yaml": {
            "task": "prose_cloze", "type": "multiple_choice", "doc_to_text": "{{prefix}}",
            "doc_to_choice": [f"{{{{options[{k}]}}}}{{{{suffix}}}}" for k in range(4)],
            "doc_to_target": "label", "target_delimiter": " ", "metric": "acc",
            "metadata": {**meta, "source": "pydoc_data/topics.py (valid/test documents of the seed-0 zoo split)",
                         "licence": "PSF-2.0"}}})

    if quiz_dir.is_dir():
        write_set(out, "capitals", capitals(random.Random(args.seed + 3), args.items, quiz_dir), {
            "capitals.yaml": {
                "task": "capitals", "type": "multiple_choice",
                "doc_to_text": "The capital of {{country}} is", "doc_to_choice": "choices",
                "doc_to_target": "label", "target_delimiter": " ", "metric": "acc",
                "metadata": {**meta, "source": "Debian bsdgames quiz/{africa,america,asia,europe}",
                             "licence": "BSD (Debian bsdgames)"}}})
    else:
        print(f"capitals: skipped ({quiz_dir} not present; apt-get install bsdgames)")


if __name__ == "__main__":
    main()
