"""Reading and writing Hugging Face model directories for merging.

Only safetensors are read: a pickle checkpoint can run code when loaded, so ``*.bin``/``*.pt``
files are refused, never opened. Outputs are written next to their destination and renamed into
place, so a failed merge never leaves a partial directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from evo.errors import EvoError
from evo.merge.config import MergeConfig
from evo.merge.engine import Merger, _check_same_tensors, task_vectors

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise EvoError(f"{index}: not a safetensors index ({err})") from None
        files = [path / s for s in shards]
        for f in files:
            if not f.is_file():
                raise EvoError(f"{index}: shard {f.name} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise EvoError(f"{path / pickles[0]}: pickle checkpoints are refused (they can run code when loaded); "
                       "convert the model to safetensors")
    raise EvoError(f"{path}: no *.safetensors weights found")


def load_model_dir(path) -> tuple[dict[str, Tensor], "transformers.PretrainedConfig"]:  # noqa: F821
    """Tensors and config of an HF model directory (single or sharded safetensors).

    Raises EvoError for a missing directory, pickle-only weights, or a NaN/inf in any tensor.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise EvoError(f"{path}: model directory not found")
    tensors: dict[str, Tensor] = {}
    for f in _weight_files(path):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as err:
            raise EvoError(f"{f}: cannot read safetensors ({err})") from None
        for name, t in part.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise EvoError(f"{f}: tensor {name} contains NaN or inf")
        tensors.update(part)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise EvoError(f"{path / 'config.json'}: cannot read model config ({str(err).splitlines()[0]})") from None
    return tensors, config


def _num_layers(config, tensors) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    from evo.merge.params import _LAYER_RE
    idx = {int(m.group(1)) for name in tensors if (m := _LAYER_RE.search(name))}
    return max(idx) + 1 if idx else 1


def merge_to_dir(config: MergeConfig, out_dir, *, resolve: Callable[[str], Path] = lambda name: Path(name),
                 seed: int = 0) -> Path:
    """Merge ``config`` from model directories into a new HF directory ``out_dir``.

    Writes model.safetensors (in ``config.dtype``; the arithmetic runs in float32), config.json,
    the tokenizer files of ``tokenizer_source`` (else the base) and generation_config.json when
    present. Refuses an existing ``out_dir``; on any error nothing is left behind.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise EvoError(f"{out_dir}: output directory already exists")
    if not out_dir.parent.is_dir():
        raise EvoError(f"{out_dir.parent}: parent directory of the output does not exist")
    # Without a base model (linear, nuslerp) the first model is only the reference the task
    # vectors are taken against; it still gets its own (zero) delta so the recipe is unchanged.
    base_name = config.base_model or config.models[0].model
    base_dir = resolve(base_name)
    base, hf_config = load_model_dir(base_dir)
    base = {n: t.float() if t.is_floating_point() else t for n, t in base.items()}
    others = {}
    for e in config.models:
        if e.model != config.base_model:
            sd = base if e.model == base_name else load_model_dir(resolve(e.model))[0]
            _check_vocab(base, sd, e.model)
            others[e.model] = sd
    for model, sd in others.items():
        _check_same_tensors(base, sd, model)
    floats = {n: t for n, t in base.items() if t.is_floating_point()}
    deltas = task_vectors(floats, {m: {n: sd[n] for n in floats} for m, sd in others.items()})
    merger = Merger(floats, deltas, num_layers=_num_layers(hf_config, base))
    merged = merger.merge(config, seed=seed)

    dtype = _DTYPES[config.dtype]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tensors = {n: (merged[n].to(dtype) if n in merged else t).contiguous() for n, t in base.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config.dtype = config.dtype
        hf_config.save_pretrained(str(tmp))
        tok_dir = resolve(config.tokenizer_source) if config.tokenizer_source else base_dir
        if config.tokenizer_source and not Path(tok_dir).is_dir():
            raise EvoError(f"{tok_dir}: tokenizer_source directory not found")
        for name in _TOKENIZER_FILES:
            if (Path(tok_dir) / name).is_file():
                shutil.copy2(Path(tok_dir) / name, tmp / name)
        if (Path(base_dir) / "generation_config.json").is_file():
            shutil.copy2(Path(base_dir) / "generation_config.json", tmp / "generation_config.json")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_vocab(base: dict, sd: dict, model: str) -> None:
    """Name the vocabulary when embedding rows differ: the usual cause of a shape mismatch."""
    for name, t in sorted(base.items(), key=lambda kv: "embed" not in kv[0]):  # embeddings first
        if "embed" in name or name.startswith("lm_head"):
            if name in sd and sd[name].shape[0] != t.shape[0] and sd[name].shape[1:] == t.shape[1:]:
                raise EvoError(f"model '{model}': tensor {name} has {sd[name].shape[0]} vocabulary rows, "
                               f"the base has {t.shape[0]}")
