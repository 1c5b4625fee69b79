"""A merge recipe as plain, validated data in mergekit's YAML shape.

Validation happens here, before any model is loaded, so a wrong field fails at once with the
file and field it came from (the way mergekit's pydantic configs do).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evo.core.errors import EvoError
from evo.core.fs import atomic_write_text, read_yaml
from evo.core.tensors import DTYPE_NAMES

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "slices"}


@dataclass(frozen=True)
class ModelEntry:
    """One source model and its per-model parameter settings."""

    model: str
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """Layers ``layer_range`` = [start, end) of ``model`` (mergekit ``slices[].sources[]``)."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Slice:
    """One stretch of output layers, merged from its sources' layer ranges (all equally long)."""

    sources: tuple[SliceSource, ...]
    parameters: dict = field(default_factory=dict)
    base_model: str | None = None

    @property
    def num_layers(self) -> int:
        a, b = self.sources[0].layer_range
        return b - a


@dataclass(frozen=True)
class MergeConfig:
    """A mergekit-style recipe. Hash it via ``fingerprint()`` (the dicts inside are not hashable)."""

    merge_method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str = "float32"
    tokenizer_source: str | None = None
    # mergekit ``slices:``: the output's layers stacked from these ranges (then ``models`` is
    # empty); embeddings come from the first slice's sources, the final norm and head from the last
    slices: tuple[Slice, ...] = ()

    def to_dict(self) -> dict:
        """The mergekit YAML mapping (deep copies; empty/None fields are left out)."""
        d: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            d["base_model"] = self.base_model
        models = []
        for m in self.models:
            entry: dict[str, Any] = {"model": m.model}
            if m.parameters:
                entry["parameters"] = copy.deepcopy(m.parameters)
            models.append(entry)
        if models or not self.slices:
            d["models"] = models
        if self.slices:
            d["slices"] = [_slice_dict(sl) for sl in self.slices]
        if self.parameters:
            d["parameters"] = copy.deepcopy(self.parameters)
        d["dtype"] = self.dtype
        if self.tokenizer_source is not None:
            d["tokenizer_source"] = self.tokenizer_source
        return d

    def fingerprint(self) -> str:
        """Stable JSON of ``to_dict()``: equal recipes give equal strings (cache keys, hashes)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any, source: str = "<config>") -> "MergeConfig":
        """Validate a mergekit mapping; any mistake raises EvoError naming ``source`` and the field."""
        from evo.merge.registry import METHODS

        if not isinstance(d, dict):
            raise EvoError(f"{source}: a merge config must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - _TOP_KEYS)
        if unknown:
            raise EvoError(f"{source}: unsupported field '{unknown[0]}' (known: {', '.join(sorted(_TOP_KEYS))})")
        name = d.get("merge_method")
        if name is None:
            raise EvoError(f"{source}: missing field 'merge_method'")
        if name not in METHODS:
            raise EvoError(f"{source}: unknown merge_method '{name}' (known: {', '.join(sorted(METHODS))})")
        method = METHODS[name]
        specs = {p.name: p for p in method.params}

        base = d.get("base_model")
        if base is not None and not isinstance(base, str):
            raise EvoError(f"{source}: base_model must be a string")
        raw_models = d.get("models")
        if "slices" in d:
            if raw_models:
                raise EvoError(f"{source}: give 'models' or 'slices', not both")
            return cls._with_slices(d, method, specs, base, source)
        if not isinstance(raw_models, list) or not raw_models:
            raise EvoError(f"{source}: missing field 'models' (a non-empty list)")
        models, seen = [], set()
        for i, m in enumerate(raw_models):
            where = f"{source}: models[{i}]"
            if not isinstance(m, dict) or not isinstance(m.get("model"), str):
                raise EvoError(f"{where}: missing field 'model' (a string)")
            extra = sorted(set(m) - {"model", "parameters"})
            if extra:
                raise EvoError(f"{where}: unsupported field '{extra[0]}'")
            if m["model"] in seen:
                raise EvoError(f"{where}: model '{m['model']}' is listed twice")
            seen.add(m["model"])
            params = m.get("parameters") or {}
            _check_params(params, specs, f"{where}.parameters", per_model=True)
            models.append(ModelEntry(m["model"], copy.deepcopy(params)))
        params = d.get("parameters") or {}
        _check_params(params, specs, f"{source}: parameters", per_model=False)
        _check_inputs(method, name, models, base, source)
        dtype, tok = _dtype_and_tokenizer(d, source)
        return cls(name, tuple(models), base, copy.deepcopy(params), dtype, tok)

    @classmethod
    def _with_slices(cls, d: dict, method, specs: dict, base: str | None, source: str) -> "MergeConfig":
        raw = d["slices"]
        if not isinstance(raw, list) or not raw:
            raise EvoError(f"{source}: slices: a non-empty list of {{sources: [...]}}")
        slices = []
        for k, sl in enumerate(raw):
            where = f"{source}: slices[{k}]"
            if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
                raise EvoError(f"{where}: missing field 'sources' (a non-empty list)")
            extra = sorted(set(sl) - {"sources", "parameters", "base_model"})
            if extra:
                raise EvoError(f"{where}: unsupported field '{extra[0]}'")
            sources, seen = [], set()
            for i, src in enumerate(sl["sources"]):
                at = f"{where}.sources[{i}]"
                if not isinstance(src, dict) or not isinstance(src.get("model"), str):
                    raise EvoError(f"{at}: missing field 'model' (a string)")
                extra = sorted(set(src) - {"model", "layer_range", "parameters"})
                if extra:
                    raise EvoError(f"{at}: unsupported field '{extra[0]}'")
                rng = src.get("layer_range")
                if not (isinstance(rng, list) and len(rng) == 2 and all(type(x) is int for x in rng)
                        and 0 <= rng[0] < rng[1]):
                    raise EvoError(f"{at}.layer_range: expected [start, end) with 0 <= start < end, got {rng!r}")
                if src["model"] in seen:
                    raise EvoError(f"{at}: model '{src['model']}' is listed twice in one slice")
                seen.add(src["model"])
                params = src.get("parameters") or {}
                _check_params(params, specs, f"{at}.parameters", per_model=True)
                sources.append(SliceSource(src["model"], (rng[0], rng[1]), copy.deepcopy(params)))
            if len({s.layer_range[1] - s.layer_range[0] for s in sources}) > 1:
                raise EvoError(f"{where}: every source of a slice must span as many layers "
                               f"(got {', '.join(f'{s.model} {list(s.layer_range)}' for s in sources)})")
            params = sl.get("parameters") or {}
            _check_params(params, specs, f"{where}.parameters", per_model=False)
            slice_base = sl.get("base_model", base)
            if slice_base is not None and not isinstance(slice_base, str):
                raise EvoError(f"{where}.base_model must be a string")
            if slice_base is not None and slice_base not in seen and method.needs_base:
                raise EvoError(f"{where}: base_model '{slice_base}' must be one of the slice's sources")
            entries = [ModelEntry(s.model, s.parameters) for s in sources]
            _check_inputs(method, method.name, entries, slice_base if slice_base in seen else None, where)
            slices.append(Slice(tuple(sources), copy.deepcopy(params), slice_base))
        params = d.get("parameters") or {}
        _check_params(params, specs, f"{source}: parameters", per_model=False)
        dtype, tok = _dtype_and_tokenizer(d, source)
        return cls(method.name, (), base, copy.deepcopy(params), dtype, tok, tuple(slices))

    def slice_config(self, index: int) -> "MergeConfig":
        """Slice ``index`` as a plain merge of its sources (its parameters over the global ones)."""
        sl = self.slices[index]
        base = sl.base_model if sl.base_model in {s.model for s in sl.sources} else None
        return MergeConfig(self.merge_method, tuple(ModelEntry(s.model, s.parameters) for s in sl.sources), base,
                           {**self.parameters, **sl.parameters}, self.dtype, self.tokenizer_source)

    @classmethod
    def from_yaml(cls, path) -> "MergeConfig":
        return cls.from_dict(read_yaml(path, "merge config"), source=str(path))

    def to_yaml(self, path) -> None:
        """Write atomically: a reader never sees a half-written recipe."""
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_inputs(method, name: str, models, base, source: str) -> None:
    """The method's input contract: a base where it needs one (none where it forbids one), and
    how many models besides the base."""
    if method.needs_base and base is None:
        raise EvoError(f"{source}: merge_method '{name}' needs a base_model")
    if getattr(method, "forbids_base", False) and base is not None:
        raise EvoError(f"{source}: merge_method '{name}' takes one model and no base_model "
                       f"(drop base_model: {base})")
    n = sum(1 for m in models if method.base_entries_merge or m.model != base)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = method.min_models if method.max_models == method.min_models else f">= {method.min_models}"
        raise EvoError(f"{source}: merge_method '{name}' needs {want} models besides the base, got {n}")


def _dtype_and_tokenizer(d: dict, source: str) -> tuple[str, str | None]:
    dtype = d.get("dtype", "float32")
    if dtype not in DTYPE_NAMES:
        raise EvoError(f"{source}: dtype '{dtype}' is not one of {', '.join(DTYPE_NAMES)}")
    tok = d.get("tokenizer_source")
    if tok is not None and not isinstance(tok, str):
        raise EvoError(f"{source}: tokenizer_source must be a model name or path")
    return dtype, tok


def _slice_dict(sl: Slice) -> dict:
    out: dict[str, Any] = {"sources": []}
    for s in sl.sources:
        src: dict[str, Any] = {"model": s.model, "layer_range": list(s.layer_range)}
        if s.parameters:
            src["parameters"] = copy.deepcopy(s.parameters)
        out["sources"].append(src)
    if sl.parameters:
        out["parameters"] = copy.deepcopy(sl.parameters)
    if sl.base_model is not None:
        out["base_model"] = sl.base_model
    return out

def _check_params(params: Any, specs: dict, where: str, *, per_model: bool) -> None:
    if not isinstance(params, dict):
        raise EvoError(f"{where}: must be a mapping of parameter names to values")
    for key, value in params.items():
        spec = specs.get(key)
        if spec is None:
            raise EvoError(f"{where}: unknown parameter '{key}' (known: {', '.join(sorted(specs))})")
        if per_model and not spec.per_model:
            raise EvoError(f"{where}: parameter '{key}' is global; set it under the top-level 'parameters'")
        _check_value(value, spec.kind, f"{where}.{key}")


def _check_value(value: Any, kind: type, where: str) -> None:
    """Scalar, gradient list of scalars, or filter list of {filter, value} (mergekit's shapes)."""
    scalar = (bool,) if kind is bool else (int, float)
    if isinstance(value, scalar) and not (kind is not bool and isinstance(value, bool)):
        return
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, scalar) and not (kind is not bool and isinstance(v, bool)) for v in value):
            return
        if all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                extra = set(v) - {"filter", "value"}
                if "value" not in v or extra or not isinstance(v.get("filter", ""), (str, type(None))):
                    raise EvoError(f"{where}[{i}]: a filter entry is {{filter: NAME, value: V}}")
                _check_value(v["value"], kind, f"{where}[{i}].value")
            return
    raise EvoError(f"{where}: expected a {kind.__name__}, a list of them, or a filter list; got {value!r}")
