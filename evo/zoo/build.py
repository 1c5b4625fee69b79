"""The model zoo: a small Llama base and one specialist per text domain, trained on CPU.

Merging needs models that share a base (so their weights live in one basin) and that differ
in what they are good at (so a merge has something to gain). ``build_zoo`` makes exactly that:
a byte-level BPE tokenizer, a base model trained from scratch on all domains mixed, and one
specialist per domain fine-tuned from the base with a modest learning rate and few steps.
Each specialist ends up best on its own domain and worse than the base elsewhere; the
perplexity table in ``zoo.json`` records it.

Layout of a zoo directory::

    tokenizer/  base/  specialists/<domain>/      Hugging Face dirs (safetensors + tokenizer)
    data/<domain>/{train,valid,test}.jsonl        one {"text": ...} per line
    zoo.json                                      settings, sources, paths, perplexity table
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from evo.data import corpus
from evo.core.errors import EvoError
from evo.core.fs import staged_dir
from evo.data.text import read_texts
from evo.data.tokens import token_blocks

MANIFEST = "zoo.json"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
SPECIAL_TOKENS = {"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}


@dataclass(frozen=True)
class ZooPreset:
    """Model shape, text budget and training schedule of one zoo size."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    max_chars: int          # per domain, before splitting
    doc_chars: int          # documents are cut to about this many characters
    base_steps: int
    base_lr: float
    specialist_steps: int
    specialist_lr: float
    eval_blocks: int        # test blocks per domain in the perplexity table
    weight_decay: float = 0.01


PRESETS: dict[str, ZooPreset] = {
    # Tests: seconds for the whole zoo; an under-trained base, so every specialist's gain on its
    # own domain is large and certain.
    "micro": ZooPreset(vocab_size=384, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       seq_len=64, batch_size=8, max_chars=60_000, doc_chars=1_000,
                       base_steps=60, base_lr=1e-2, specialist_steps=40, specialist_lr=5e-3,
                       eval_blocks=16),
    # Default benchmark zoo: a few minutes on 2 cores.
    "tiny": ZooPreset(vocab_size=3072, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384,
                      seq_len=128, batch_size=16, max_chars=1_200_000, doc_chars=4_000,
                      base_steps=300, base_lr=3e-3, specialist_steps=100, specialist_lr=3e-4,
                      eval_blocks=48),
    # Benchmarks with more headroom: ~50 min on 2 cores (2.1 s per step measured); not yet tuned.
    "small": ZooPreset(vocab_size=8192, hidden_size=320, num_layers=8, num_heads=5, intermediate_size=896,
                       seq_len=256, batch_size=8, max_chars=4_000_000, doc_chars=4_000,
                       base_steps=800, base_lr=1.5e-3, specialist_steps=200, specialist_lr=5e-4,
                       eval_blocks=64),
}


@dataclass
class Zoo:
    """A built zoo on disk. Paths are absolute; ``table`` is zoo.json's perplexity table:
    ``table["log_ppl"][model][domain]`` and ``table["ppl"][model][domain]`` on the test split,
    where ``model`` is ``"base"`` or a domain name (that domain's specialist)."""

    root: Path
    domains: list[str]
    tokenizer_dir: Path
    base_dir: Path
    specialist_dirs: dict[str, Path]
    num_layers: int
    table: dict
    manifest: dict = field(repr=False, default_factory=dict)

    @property
    def seq_len(self) -> int:
        return int(self.manifest["settings"]["preset"]["seq_len"])

    def data_dir(self, domain: str, split: str) -> Path:
        """The JSONL file of one domain's split (valid: search fitness; test: final report)."""
        if domain not in self.domains or split not in SPLITS:
            raise EvoError(f"zoo {self.root} has no data for domain {domain!r}, split {split!r}")
        return self.root / "data" / domain / f"{split}.jsonl"

    def texts(self, domain: str, split: str) -> list[str]:
        return read_texts(self.data_dir(domain, split))

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "Zoo":
        root = Path(out_dir).resolve()
        path = root / MANIFEST
        if not path.is_file():
            raise EvoError(f"{root} is not a model zoo (no {MANIFEST}); build one with experiments/make_zoo.py")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                root=root,
                domains=list(manifest["settings"]["domains"]),
                tokenizer_dir=root / manifest["paths"]["tokenizer"],
                base_dir=root / manifest["paths"]["base"],
                specialist_dirs={d: root / p for d, p in manifest["paths"]["specialists"].items()},
                num_layers=int(manifest["num_layers"]),
                table=manifest["table"],
                manifest=manifest,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise EvoError(f"{path}: malformed zoo manifest ({err})") from None


def zoo_settings(domains: Sequence[str], size: str, seed: int, base_steps: int | None = None,
                 specialist_steps: int | None = None) -> dict:
    """Everything that determines a zoo's content; equal settings mean a zoo can be reused."""
    if size not in PRESETS:
        raise EvoError(f"unknown zoo size {size!r}; choose from {', '.join(PRESETS)}")
    if not domains or len(set(domains)) != len(domains):
        raise EvoError(f"zoo domains must be distinct and non-empty, got {list(domains)}")
    for name in domains:
        corpus.get_domain(name)
    preset = PRESETS[size]
    if base_steps is not None:
        preset = dataclasses.replace(preset, base_steps=int(base_steps))
    if specialist_steps is not None:
        preset = dataclasses.replace(preset, specialist_steps=int(specialist_steps))
    return {"format": FORMAT_VERSION, "size": size, "seed": int(seed), "domains": list(domains),
            "preset": dataclasses.asdict(preset)}


def build_zoo(out_dir: str | os.PathLike, *, domains: Sequence[str] = ("en", "de", "code"), size: str = "tiny",
              seed: int = 0, base_steps: int | None = None, specialist_steps: int | None = None,
              progress: bool = True) -> Zoo:
    """Build (or reuse) a zoo in ``out_dir`` and return it.

    An existing zoo with the same settings is returned as is; one with other settings is
    replaced; a non-empty directory that is not a zoo is refused. The new zoo is written to a
    sibling temp directory and renamed into place, so ``out_dir`` is never half-written.
    """
    out = Path(out_dir).resolve()
    settings = zoo_settings(domains, size, seed, base_steps, specialist_steps)
    if out.exists():
        if not out.is_dir():
            raise EvoError(f"{out} exists and is not a directory; refusing to overwrite it")
        if (out / MANIFEST).is_file():
            try:
                existing = Zoo.load(out)
                if existing.manifest.get("settings") == settings and is_complete(existing):
                    return existing
            except EvoError:
                pass  # a broken zoo is rebuilt like one with other settings
        elif any(out.iterdir()):
            raise EvoError(f"{out} is not empty and holds no {MANIFEST}; refusing to replace it with a zoo")

    with staged_dir(out, replace=True, create=False) as tmp:  # an older zoo is swapped out whole
        _build_into(tmp, settings, progress)
    return Zoo.load(out)


def is_complete(zoo: Zoo) -> bool:
    dirs = [zoo.tokenizer_dir, zoo.base_dir, *zoo.specialist_dirs.values()]
    data = [zoo.data_dir(d, s) for d in zoo.domains for s in SPLITS]
    return set(zoo.specialist_dirs) == set(zoo.domains) \
        and all((d / "model.safetensors").is_file() for d in dirs[1:]) \
        and all((d / "tokenizer.json").is_file() for d in dirs) and all(p.is_file() for p in data)


def _build_into(root: Path, settings: dict, progress: bool) -> None:
    started = time.time()
    preset = ZooPreset(**settings["preset"])
    seed = settings["seed"]
    domains = settings["domains"]
    root.mkdir(parents=True)

    splits: dict[str, dict[str, list[str]]] = {}
    for name in domains:
        docs = corpus.load_domain(name, max_chars=preset.max_chars, doc_chars=preset.doc_chars)
        splits[name] = corpus.split_documents(docs, seed=seed)
        for split in SPLITS:
            if not splits[name][split]:
                raise EvoError(f"domain {name!r} has no {split} documents at this budget; use a larger zoo size")
            write_jsonl(root / "data" / name / f"{split}.jsonl", splits[name][split])

    tokenizer = train_tokenizer([splits[d]["train"] for d in domains], preset.vocab_size)
    tokenizer.save_pretrained(root / "tokenizer")

    streams = {d: token_stream(splits[d]["train"], tokenizer) for d in domains}
    tests = {d: token_blocks(splits[d]["test"], tokenizer, preset.seq_len, preset.eval_blocks) for d in domains}

    base = make_model(preset, tokenizer, seed)
    train(base, [streams[d] for d in domains], preset.base_steps, preset.base_lr, preset, seed,
          desc="base", progress=progress)
    _save(base, tokenizer, root / "base")
    table = {"base": evaluate(base, tests)}

    for i, name in enumerate(domains):
        specialist = make_model(preset, tokenizer, seed)
        specialist.load_state_dict(base.state_dict())
        train(specialist, [streams[name]], preset.specialist_steps, preset.specialist_lr, preset,
              seed + 1 + i, desc=f"specialist {name}", progress=progress)
        _save(specialist, tokenizer, root / "specialists" / name)
        table[name] = evaluate(specialist, tests)

    manifest = {
        "settings": settings,
        "sources": {d: corpus.describe(d) for d in domains},
        "documents": {d: {s: len(splits[d][s]) for s in SPLITS} for d in domains},
        "paths": {"tokenizer": "tokenizer", "base": "base",
                  "specialists": {d: f"specialists/{d}" for d in domains},
                  "data": {d: {s: f"data/{d}/{s}.jsonl" for s in SPLITS} for d in domains}},
        "num_layers": preset.num_layers,
        "num_params": sum(p.numel() for p in base.parameters()),
        "eval": {"split": "test", "seq_len": preset.seq_len,
                 "tokens": {d: int(tests[d].numel()) for d in domains}},
        "table": {"log_ppl": table,
                  "ppl": {m: {d: math.exp(v) for d, v in row.items()} for m, row in table.items()}},
        "wall_time_s": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    # Written last: a directory with a manifest is a complete zoo.
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def train_tokenizer(domain_texts: Sequence[list[str]], vocab_size: int):
    """A byte-level BPE tokenizer (no unknown tokens, exact round trip) trained on equal
    shares of every domain, so no domain's words dominate the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    share = min(sum(map(len, texts)) for texts in domain_texts)

    def mixed():
        for texts in domain_texts:
            taken = 0
            for text in texts:
                if taken >= share:
                    break
                taken += len(text)
                yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(mixed(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents as one int64 token stream, each followed by EOS (as in ``token_blocks``)."""
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def make_model(preset: ZooPreset, tokenizer, seed: int):
    """A freshly initialised Llama from ``preset``; the seed fixes the init without touching
    the caller's global RNG state."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads, max_position_embeddings=preset.seq_len,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(model, streams: Sequence[torch.Tensor], steps: int, lr: float, preset: ZooPreset, seed: int,
          desc: str = "train", progress: bool = True) -> list[float]:
    """AdamW on random windows of the token streams; batch rows cycle through the streams, so
    every domain gets an equal share whatever its size. Returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    n = preset.seq_len
    for s in streams:
        if len(s) <= n + 1:
            raise EvoError(f"training text of {len(s)} tokens is shorter than one {n}-token window")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": preset.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, steps))
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        rows = []
        for r in range(preset.batch_size):
            s = streams[(step * preset.batch_size + r) % len(streams)]
            start = int(torch.randint(0, len(s) - n, (1,), generator=gen))
            rows.append(s[start : start + n])
        batch = torch.stack(rows)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.inference_mode()
def evaluate(model, blocks: dict[str, torch.Tensor], batch_size: int = 16) -> dict[str, float]:
    """Log-perplexity (mean NLL, nats/token) of ``model`` on each domain's token blocks.

    transformers' own causal-LM loss (the one the zoo trains on), weighted by tokens across
    batches: the same quantity ``evo.scoring.fitness.mean_nll`` gives a candidate, computed here
    without reaching up into the scoring layer."""
    model.eval()
    out = {}
    for d, b in blocks.items():
        total, count = 0.0, 0
        for start in range(0, b.shape[0], batch_size):
            x = b[start : start + batch_size]
            n = x.shape[0] * (x.shape[1] - 1)
            total += float(model(input_ids=x, labels=x).loss) * n
            count += n
        out[d] = total / count if count else math.nan
    return out


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def markdown_table(table: dict, digits: int = 2) -> str:
    """The perplexity table as markdown: rows = models, columns = domains + mean; the best
    (lowest) value in each column is bold. The mean is of log-perplexities, shown as a ppl."""
    ppl, log_ppl = table["ppl"], table["log_ppl"]
    models = list(ppl)
    domains = list(ppl[models[0]])
    cols = domains + ["mean"]
    values = {m: [ppl[m][d] for d in domains] + [math.exp(sum(log_ppl[m].values()) / len(domains))]
              for m in models}
    best = [min(values[m][j] for m in models) for j in range(len(cols))]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in models:
        name = "base" if m == "base" else f"{m} specialist"
        cells = [f"**{v:.{digits}f}**" if v == best[j] else f"{v:.{digits}f}" for j, v in enumerate(values[m])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
