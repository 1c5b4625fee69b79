"""Reading and writing Hugging Face model directories for merging.

Only safetensors are read: a pickle checkpoint can run code when loaded, so ``*.bin``/``*.pt``
files are refused, never opened. Outputs are written next to their destination and renamed into
place, so a failed merge never leaves a partial directory behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from evo.core.errors import EvoError
from evo.core.fs import staged_dir
from evo.core.tensors import DTYPES
from evo.merge.config import MergeConfig
from evo.merge.engine import Merger, check_same_tensors
from evo.merge.params import LAYER_RE
from evo.merge.safetensors_io import SafetensorsWriter, check_finite, open_model_files

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt")


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
            check_finite(t, str(f), name)
        tensors.update(part)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise EvoError(f"{path / 'config.json'}: cannot read model config ({str(err).splitlines()[0]})") from None
    return tensors, config


def _num_layers(config, tensors) -> int:
    n = config.get("num_hidden_layers") if isinstance(config, dict) else getattr(config, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    from evo.merge.params import LAYER_RE
    idx = {int(m.group(1)) for name in tensors if (m := LAYER_RE.search(name))}
    return max(idx) + 1 if idx else 1


def merge_to_dir(config: MergeConfig, out_dir, *, resolve: Callable[[str], Path] = lambda name: Path(name),
                 seed: int = 0, source_dtype: str | None = None) -> Path:
    """Merge ``config`` from model directories into a new HF directory ``out_dir``.

    Streams: every source file is mapped (``safetensors_io``), and each output tensor is merged
    from the sources' tensors of that name and written before the next is read, so memory holds
    one tensor per source plus scratch, never a whole model. Writes model.safetensors (in
    ``config.dtype``; the arithmetic runs in float32), config.json, the tokenizer files of
    ``tokenizer_source`` (else the base) and generation_config.json when present. Refuses an
    existing ``out_dir``; on any error nothing is left behind.

    ``source_dtype``: first round the base to this dtype and each task vector (taken in float32
    against that rounded base) too, as a search's evaluators hold them (``evo.scoring.sources``), so a
    release is the model its recorded fitness was measured on.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise EvoError(f"{out_dir}: output directory already exists")
    if not out_dir.parent.is_dir():
        raise EvoError(f"{out_dir.parent}: parent directory of the output does not exist")
    if config.slices:
        return _merge_slices(config, out_dir, resolve, seed)
    # Without a base model (linear, nuslerp) the first model is only the reference the task
    # vectors are taken against; it still gets its own (zero) delta so the recipe is unchanged.
    base_name = config.base_model or config.models[0].model
    base_dir = Path(resolve(base_name))
    base = open_model(base_dir)
    hf_config = read_config(base_dir)
    others = {}
    for e in config.models:
        if e.model != config.base_model and e.model not in others:
            others[e.model] = base if e.model == base_name else open_model(Path(resolve(e.model)))
    infos = {n: info for n, (_, info) in base.items()}
    for model, tensors in others.items():
        other = {n: info for n, (_, info) in tensors.items()}
        _check_vocab(infos, other, model)
        check_same_tensors(infos, other, model)
    floats = [n for n, info in infos.items() if info.dtype.is_floating_point]
    largest = max((infos[n].numel for n in floats), default=1)
    merger = Merger({}, {}, num_layers=_num_layers(hf_config, infos), largest=largest)
    plan = merger.plan(config, others)
    dtype = DTYPES[config.dtype]
    held = DTYPES[source_dtype] if source_dtype not in (None, "float32") else None
    scratch = merger.scratch

    with staged_dir(out_dir) as tmp:  # renamed into place when complete, removed on any error
        specs = [(n, dtype if n in floats else info.dtype, info.shape) for n, info in infos.items()]
        with SafetensorsWriter(tmp / "model.safetensors", specs, {"format": "pt"}) as writer:
            for name in infos:
                src, _ = base[name]
                t = src.tensor(name)
                check_finite(t, str(src.path), name)
                if name not in floats:
                    writer.write(name, t)
                    continue
                b = t if t.dtype == torch.float32 else scratch.get("io.base", t.shape).copy_(t)
                if held is not None:  # the base as the evaluators hold it; task vectors against it
                    b = scratch.get("io.held", t.shape).copy_(b.to(held))
                deltas = {}
                for i, (model, tensors) in enumerate(others.items()):
                    if tensors is base:
                        deltas[model] = scratch.get(f"io.delta{i}", t.shape).zero_()
                        continue
                    f, _ = tensors[name]
                    x = f.tensor(name)
                    check_finite(x, str(f.path), name)
                    deltas[model] = torch.sub(x, b, out=scratch.get(f"io.delta{i}", t.shape))
                    if held is not None:
                        deltas[model].copy_(deltas[model].to(held))
                out = merger.merge_tensor(plan, name, b, deltas, scratch.get("io.out", t.shape), seed)
                writer.write(name, out if dtype == torch.float32 else out.to(dtype))
        _write_config(base_dir, tmp, config.dtype)
        _copy_tokenizer(config, resolve, base_dir, tmp)
    return out_dir


def _layer_names(tensors: dict, layer: int) -> dict[str, str]:
    """``{name with the layer index as {}: name}`` of one layer's tensors (``model.layers.{}.mlp...``)."""
    out = {}
    for name in tensors:
        m = LAYER_RE.search(name)
        if m and int(m.group(1)) == layer:
            start, end = m.span(1)
            out[name[:start] + "{}" + name[end:]] = name
    return out


def _merge_slices(config: MergeConfig, out_dir: Path, resolve: Callable[[str], Path], seed: int) -> Path:
    """mergekit ``slices:``: the output's layers are each slice's layers in turn, merged with the
    method from the slice's sources (passthrough: copied from its one source); tensors outside the
    layers (embeddings, final norm, head) are merged from the first slice's sources when their name
    holds ``embed``, else from the last slice's, as mergekit places pre- and post-layer weights.
    Per-layer ("gradient") parameters run over each slice's own layers, as in mergekit. The output's
    config is the base's (else the first source's) with ``num_hidden_layers`` the total."""
    names = {s.model for sl in config.slices for s in sl.sources}
    dirs = {m: Path(resolve(m)) for m in names | ({config.base_model} if config.base_model else set())}
    models = {m: open_model(d) for m, d in dirs.items()}
    ref_name = config.base_model or config.slices[0].sources[0].model
    hf_config = read_config(dirs[ref_name])
    ref = models[ref_name]
    outside = [n for n in ref if not LAYER_RE.search(n)]
    pre = [n for n in outside if "embed" in n]
    post = [n for n in outside if "embed" not in n]
    # (output name, slice index, name the merge sees (its layer position in the slice), {model: input name})
    plan: list[tuple[str, int, str, dict[str, str]]] = []
    for name in pre:
        plan.append((name, 0, name, {s.model: name for s in config.slices[0].sources}))
    layer = 0
    for k, sl in enumerate(config.slices):
        for offset in range(sl.num_layers):
            per_source = {}
            for s in sl.sources:
                at = s.layer_range[0] + offset
                found = _layer_names({n: None for n in models[s.model]}, at)
                if not found:
                    raise EvoError(f"slices[{k}]: model '{s.model}' has no layer {at} "
                                   f"(layer_range {list(s.layer_range)})")
                per_source[s.model] = found
            template = per_source[sl.sources[0].model]
            for key in template:
                missing = [m for m, f in per_source.items() if key not in f]
                if missing:
                    raise EvoError(f"slices[{k}]: model '{missing[0]}' has no tensor {key.format('N')}")
                plan.append((key.format(layer), k, key.format(offset), {m: f[key] for m, f in per_source.items()}))
            layer += 1
    for name in post:
        plan.append((name, len(config.slices) - 1, name, {s.model: name for s in config.slices[-1].sources}))

    infos = {}
    for out_name, _, _, inputs in plan:
        m, n = next(iter(inputs.items()))
        infos[out_name] = models[m][n][1]
        for other, n2 in inputs.items():
            if models[other][n2][1].shape != infos[out_name].shape:
                raise EvoError(f"model '{other}': tensor {n2} has shape {tuple(models[other][n2][1].shape)}, "
                               f"'{m}' has {tuple(infos[out_name].shape)} ({out_name})")
    floats = {n for n, info in infos.items() if info.dtype.is_floating_point}
    largest = max((infos[n].numel for n in floats), default=1)
    mergers = [Merger({}, {}, num_layers=sl.num_layers, largest=largest) for sl in config.slices]
    plans = []
    for k in range(len(config.slices)):
        cfg = config.slice_config(k)
        plans.append(mergers[k].plan(cfg, {e.model for e in cfg.models if e.model != cfg.base_model}))
    dtype = DTYPES[config.dtype]
    with staged_dir(out_dir) as tmp:
        specs = [(n, dtype if n in floats else infos[n].dtype, infos[n].shape) for n, *_ in plan]
        with SafetensorsWriter(tmp / "model.safetensors", specs, {"format": "pt"}) as writer:
            for out_name, k, seen_as, inputs in plan:
                scratch, mplan = mergers[k].scratch, plans[k]
                read = {}
                for m, n in inputs.items():
                    f, _ = models[m][n]
                    read[m] = f.tensor(n)
                    check_finite(read[m], str(f.path), n)
                if out_name not in floats:
                    writer.write(out_name, next(iter(read.values())))
                    continue
                ref_model = mplan.config.base_model or mplan.config.models[0].model
                b = scratch.get("io.base", read[ref_model].shape).copy_(read[ref_model])
                deltas = {}
                for i, e in enumerate(mplan.config.models):
                    if e.model == mplan.config.base_model:
                        continue
                    deltas[e.model] = torch.sub(read[e.model], b, out=scratch.get(f"io.delta{i}", b.shape))
                out = mergers[k].merge_tensor(mplan, seen_as, b, deltas, scratch.get("io.out", b.shape), seed)
                writer.write(out_name, out if dtype == torch.float32 else out.to(dtype))
        hf_config["num_hidden_layers"] = layer
        hf_config.pop("torch_dtype", None)
        hf_config["dtype"] = config.dtype
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _copy_tokenizer(config, resolve, dirs[ref_name], tmp)
    return out_dir


def _copy_tokenizer(config: MergeConfig, resolve: Callable[[str], Path], base_dir: Path, target: Path) -> None:
    """The tokenizer files of ``tokenizer_source`` (else the base) and the base's generation config."""
    tok_dir = resolve(config.tokenizer_source) if config.tokenizer_source else base_dir
    if config.tokenizer_source and not Path(tok_dir).is_dir():
        raise EvoError(f"{tok_dir}: tokenizer_source directory not found")
    for name in _TOKENIZER_FILES:
        if (Path(tok_dir) / name).is_file():
            shutil.copyfile(Path(tok_dir) / name, target / name)  # not copy2: the umask's modes, not the source's
    if (Path(base_dir) / "generation_config.json").is_file():
        shutil.copyfile(Path(base_dir) / "generation_config.json", target / "generation_config.json")


def open_model(path: Path) -> dict:
    """name -> (mapped file, tensor info) of an HF model directory, nothing read yet."""
    if not path.is_dir():
        raise EvoError(f"{path}: model directory not found")
    return open_model_files(_weight_files(path))


def read_config(path: Path) -> dict:
    """config.json as data. transformers' AutoConfig is not needed to merge (and importing it
    costs seconds); ``evo merge`` copies the base's config with only its dtype changed."""
    f = path / "config.json"
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise EvoError(f"{f}: cannot read model config ({str(err).splitlines()[0]})") from None
    return data


def _write_config(base_dir: Path, target: Path, dtype: str) -> None:
    data = read_config(base_dir)
    data.pop("torch_dtype", None)
    data["dtype"] = dtype
    (target / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_vocab(base: dict, sd: dict, model: str) -> None:
    """Name the vocabulary when embedding rows differ: the usual cause of a shape mismatch."""
    for name, t in sorted(base.items(), key=lambda kv: "embed" not in kv[0]):  # embeddings first
        if "embed" in name or name.startswith("lm_head"):
            if name in sd and sd[name].shape[0] != t.shape[0] and sd[name].shape[1:] == t.shape[1:]:
                raise EvoError(f"model '{model}': tensor {name} has {sd[name].shape[0]} vocabulary rows, "
                               f"the base has {t.shape[0]}")
