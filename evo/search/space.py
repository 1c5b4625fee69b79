"""Search spaces: typed genes encoded to and decoded from a unit vector in [0, 1]^n.

Every optimizer (GA, NSGA-II, CMA-ES, random) works on the unit vector; only this module knows
what a coordinate means. A genome decodes to a :class:`Recipe` — plain data that can be hashed,
cached, printed and written as mergekit YAML — never to tensors.

A space file (``search_spaces/*.yaml``)::

    name: ties_layerwise
    merge_method: ties            # fixed, or a categorical gene named merge_method
    layer_groups: 4               # anchors of a mergekit "gradient" across layers
    parameters: {normalize: true} # fixed global merge parameters
    genes:
      weight:  {type: float, low: 0.0, high: 1.0, scope: model_layer}
      density: {type: float, low: 0.1, high: 1.0, scope: model_layer}
      lora.rank: {type: int, low: 4, high: 32, log: true}

Scopes: ``global`` (one value: a global merge parameter, ``merge_method``, or ``lora.*``),
``layer`` (one value per layer group, global), ``model`` (one per source model),
``model_layer`` (one per source model per layer group).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evo.core.errors import EvoError
from evo.merge.config import MergeConfig, ModelEntry
from evo.search.dataflow import MERGED, SKIP, DataflowSpec, LayerPath, PathStep
from evo.search.genes import SCOPES, CategoricalGene, FloatGene, gene_from_spec
from evo.search.recipe import Recipe



# ---------------------------------------------------------------------------------------- space
DENSITY_GRID = 4096  # = MagnitudeTable's default q


@dataclass(frozen=True)
class Slot:
    """One coordinate of the genome: which gene, for which model and layer group."""

    gene: str
    model: str | None = None
    group: int | None = None

    @property
    def label(self) -> str:
        parts = [self.gene]
        if self.model is not None:
            parts.append(self.model)
        if self.group is not None:
            parts.append(f"{'s' if self.gene.startswith('path') else 'g'}{self.group}")  # path slot / layer group
        return "/".join(parts)


@dataclass(frozen=True)
class SearchSpaceSpec:
    """A parsed space file, not yet bound to models."""

    name: str
    merge_method: str | None
    layer_groups: int
    parameters: dict
    genes: dict  # name -> (gene, scope)
    source: str = "<space>"
    dataflow: DataflowSpec | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SearchSpaceSpec":
        from evo.core.fs import read_yaml

        path = Path(path)
        data = read_yaml(path, "search space file")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<space>") -> "SearchSpaceSpec":
        if not isinstance(data, dict):
            raise EvoError(f"{source}: a search space must be a mapping")
        unknown = set(data) - {"name", "description", "merge_method", "layer_groups", "parameters", "genes", "dataflow"}
        if unknown:
            raise EvoError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
        dataflow = DataflowSpec.from_dict(data["dataflow"], source) if "dataflow" in data else None
        if dataflow is not None and dataflow.layers_from == "models":
            # a path of single models' layers is a passthrough of each; there is no merge to tune
            if data.get("genes") or data.get("merge_method", "passthrough") != "passthrough":
                raise EvoError(f"{source}: dataflow.layers_from: models takes no genes and merge_method "
                               "passthrough (use layers_from: merged to search a merge and its path)")
            data = {**data, "merge_method": "passthrough", "genes": {}}
        elif "genes" not in data or not isinstance(data["genes"], dict) or not data["genes"]:
            raise EvoError(f"{source}: field 'genes' is missing or empty")
        groups = data.get("layer_groups", 1)
        if not isinstance(groups, int) or groups < 1:
            raise EvoError(f"{source}: field 'layer_groups' must be a positive integer, got {groups!r}")
        genes = {}
        for name, spec in data["genes"].items():
            where = f"{source}: genes.{name}"
            if not isinstance(spec, dict):
                raise EvoError(f"{where}: must be a mapping with a 'type'")
            scope = spec.get("scope", "global")
            if scope not in SCOPES:
                raise EvoError(f"{where}.scope: unknown scope {scope!r} (expected one of {', '.join(SCOPES)})")
            try:
                gene = gene_from_spec(spec)
            except KeyError as exc:
                raise EvoError(f"{where}.{exc.args[0]}: missing field") from None
            except (TypeError, ValueError) as exc:
                raise EvoError(f"{where}: {exc}") from None
            if name == "merge_method" and not (isinstance(gene, CategoricalGene) and scope == "global"):
                raise EvoError(f"{where}: merge_method must be a global categorical gene")
            if name.startswith("lora.") and scope != "global":
                raise EvoError(f"{where}.scope: LoRA genes are global")
            if name.startswith("lora.") and dataflow is not None:
                raise EvoError(f"{where}: LoRA genes and a data-flow path cannot be combined (yet)")
            genes[name] = (gene, scope)
        method = data.get("merge_method")
        if method is None and "merge_method" not in genes:
            raise EvoError(f"{source}: field 'merge_method' is missing (fixed, or a categorical gene)")
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise EvoError(f"{source}: field 'parameters' must be a mapping")
        return cls(str(data.get("name", Path(source).stem)), method, groups, dict(params), genes, source, dataflow)


class SearchSpace:
    """A space bound to a base model and its source models: genome <-> Recipe."""

    def __init__(self, spec: SearchSpaceSpec, models: Sequence[str], base_model: str, *, seed: int = 0,
                 dtype: str = "float32", num_layers: int | None = None):
        if not models:
            raise EvoError(f"{spec.source}: no source models to merge")
        self.spec = spec
        self.models = list(models)
        self.base_model = base_model
        self.seed = seed
        self.dtype = dtype
        self.slots: list[Slot] = []
        self.genes = {name: gene for name, (gene, _) in spec.genes.items()}
        for name, (_, scope) in spec.genes.items():
            groups = range(spec.layer_groups) if scope in ("layer", "model_layer") else [None]
            owners = self.models if scope in ("model", "model_layer") else [None]
            for model in owners:
                for group in groups:
                    self.slots.append(Slot(name, model, group))
        self.num_layers = num_layers
        flow = spec.dataflow
        if flow is not None:
            if not num_layers:
                raise EvoError(f"{spec.source}: a data-flow space needs the base model's num_hidden_layers")
            # which layer each path slot may run: nothing, or layer t mod L of one of these
            self.path_choices = (SKIP, MERGED) if flow.layers_from == MERGED else (SKIP, base_model, *self.models)
            self.genes["path"] = CategoricalGene(self.path_choices)
            if flow.scale:
                self.genes["path.scale"] = FloatGene(*flow.scale)
            for t in range(flow.repeats * num_layers):
                self.slots.append(Slot("path", None, t))
                if flow.scale:
                    self.slots.append(Slot("path.scale", None, t))
        from evo.merge.registry import METHODS

        methods = [spec.merge_method] if spec.merge_method else list(spec.genes["merge_method"][0].choices)
        for method in methods:  # fail before any model is loaded
            if method not in METHODS:
                raise EvoError(f"{spec.source}: merge_method: unknown method {method!r} (known: {', '.join(sorted(METHODS))})")
        # each method takes only its own parameters: with a method gene, the others are dropped
        self._accepts = {m: {p.name for p in METHODS[m].params} for m in methods}
        merge_params = [g for g in spec.genes if g != "merge_method" and not g.startswith("lora.")]
        for name in merge_params + list(spec.parameters):
            if not any(name in acc for acc in self._accepts.values()):
                where = f"genes.{name}" if name in spec.genes else f"parameters.{name}"
                raise EvoError(f"{spec.source}: {where}: no merge method of this space takes a parameter {name!r}")
        for name in merge_params:  # accepted but inert under every method the space can choose
            if all(name in getattr(METHODS[m], "inert", ()) for m in methods):
                warnings.warn(f"{spec.source}: genes.{name}: has no effect with merge method "
                              f"{' / '.join(methods)} (the search would spend {name!r} genes on noise)",
                              UserWarning, stacklevel=2)

    @classmethod
    def load(cls, path, models, base_model, *, base_dir=None, **kw) -> "SearchSpace":
        """The space file at ``path``; a data-flow space reads its depth from ``base_dir``'s config."""
        spec = SearchSpaceSpec.from_yaml(path)
        if spec.dataflow is not None and kw.get("num_layers") is None and base_dir is not None:
            from evo.merge.io import read_config

            kw["num_layers"] = int(read_config(Path(base_dir)).get("num_hidden_layers") or 0) or None
        return cls(spec, models, base_model, **kw)

    @property
    def dim(self) -> int:
        return len(self.slots)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.slots]

    def values(self, genome: Sequence[float]) -> dict[str, Any]:
        """Decoded value of every slot, keyed by its label (for tables and plots)."""
        return {s.label: self.genes[s.gene].decode(u) for s, u in zip(self.slots, self._check(genome))}

    def decode(self, genome: Sequence[float]) -> Recipe:
        genome = self._check(genome)
        per_model: dict[str, dict[str, list]] = {m: {} for m in self.models}
        glob: dict[str, Any] = {}
        lora: dict[str, Any] = {}
        method = self.spec.merge_method
        path: dict[int, list] = {}
        for slot, u in zip(self.slots, genome):
            if slot.gene.startswith("path"):
                path.setdefault(slot.group, [SKIP, 1.0])[slot.gene == "path.scale"] = self.genes[slot.gene].decode(u)
                continue
            gene, scope = self.spec.genes[slot.gene]
            value = gene.decode(u)
            if slot.gene == "density" and isinstance(value, float):
                # onto the grid a resident merger's magnitude tables answer without a pass over
                # the task vector (evo.merge.sparsify.MagnitudeTable): steps of 1/4096
                value = round(value * DENSITY_GRID) / DENSITY_GRID
            if slot.gene == "merge_method":
                method = value
            elif slot.gene.startswith("lora."):
                lora[slot.gene[5:]] = value
            elif scope == "global":
                glob[slot.gene] = value
            elif scope == "layer":
                glob.setdefault(slot.gene, []).append(value)
            else:
                per_model[slot.model].setdefault(slot.gene, []).append(value)
        per_model = {m: {k: _squeeze(v) for k, v in p.items()} for m, p in per_model.items()}
        glob = {k: _squeeze(v) for k, v in glob.items()}
        if self.spec.dataflow is None:
            return Recipe(self._merge_config(method, per_model, glob), lora or None, self.seed)
        return Recipe(self._merge_config(method, per_model, glob), None, self.seed, self._path(path))

    def _path(self, slots: dict[int, list]) -> LayerPath:
        """Slots in order, skipped ones dropped; a path that skips everything keeps slot 0's
        first model (a model needs one layer)."""
        L = self.num_layers
        steps = [PathStep(choice, t % L, round(float(scale), 6)) for t, (choice, scale) in sorted(slots.items())
                 if choice != SKIP]
        return LayerPath(L, tuple(steps) or (PathStep(self.path_choices[1], 0, 1.0),))

    def identity_genome(self, model: str | None = None, **values) -> np.ndarray:
        """:meth:`uniform_genome` with the path running every layer of ``model`` (default: the
        merge, or the base) once, in order, at scale 1 (the extra passes skipped)."""
        return self.uniform_genome(path_model=model, **values)

    def encode(self, recipe: Recipe) -> np.ndarray:
        """Inverse of :meth:`decode` for recipes that lie in this space (used to seed populations)."""
        cfg = recipe.merge
        params = {e.model: e.parameters for e in cfg.models}
        out = []
        where = self._slots_of(recipe.path) if self.spec.dataflow is not None else {}
        for slot in self.slots:
            if slot.gene.startswith("path"):
                step = where.get(slot.group)
                value = (SKIP if step is None else step.model) if slot.gene == "path" else (1.0 if step is None else step.scale)
                out.append(min(max(self.genes[slot.gene].encode(value), 0.0), 1.0))
                continue
            gene, scope = self.spec.genes[slot.gene]
            if slot.gene == "merge_method":
                value = cfg.merge_method
            elif slot.gene.startswith("lora."):
                value = (recipe.lora or {})[slot.gene[5:]]
            elif scope in ("global", "layer"):
                value = cfg.parameters[slot.gene]
            else:
                value = params[slot.model][slot.gene]
            if slot.group is not None and isinstance(value, (list, tuple)):
                value = value[slot.group]
            out.append(min(max(gene.encode(value), 0.0), 1.0))
        return np.asarray(out, dtype=np.float64)

    def _slots_of(self, path: LayerPath | None) -> dict[int, PathStep]:
        """Inverse of :meth:`_path`: the slot each step came from (slot t runs layer t mod L)."""
        if path is None:
            raise EvoError(f"{self.spec.source}: the recipe has no path, the space searches one")
        L, out, t = self.num_layers, {}, 0
        for step in path.steps:
            while t % L != step.layer:
                t += 1
            out[t] = step
            t += 1
        if t > self.spec.dataflow.repeats * L or any(s.model not in self.path_choices for s in path.steps):
            raise EvoError(f"{self.spec.source}: the recipe's path does not lie in this space")
        return out

    def uniform_genome(self, per_model: dict[str, dict] | None = None, path_model: str | None = None,
                       **values) -> np.ndarray:
        """A genome with every slot of gene ``g`` set to ``values[g]`` (others at the centre);
        ``per_model[m][g]`` overrides gene ``g`` for model ``m`` (e.g. one model at weight 1).
        A data-flow path starts as the identity over ``path_model`` (:meth:`identity_genome`)."""
        out = np.full(self.dim, 0.5)
        if self.spec.dataflow is not None:
            model = path_model or self.path_choices[1]
            if model not in self.path_choices[1:]:
                raise EvoError(f"{self.spec.source}: a path cannot run model {model!r} (choices: {', '.join(self.path_choices[1:])})")
            identity = LayerPath(self.num_layers, tuple(PathStep(model, i) for i in range(self.num_layers)))
            where = self._slots_of(identity)
        for i, slot in enumerate(self.slots):
            if slot.gene.startswith("path"):
                step = where.get(slot.group)
                value = (SKIP if step is None else step.model) if slot.gene == "path" else 1.0
                out[i] = min(max(self.genes[slot.gene].encode(value), 0.0), 1.0)
                continue
            own = (per_model or {}).get(slot.model, {})
            if slot.gene in own or slot.gene in values:
                value = own.get(slot.gene, values.get(slot.gene))
                out[i] = min(max(self.spec.genes[slot.gene][0].encode(value), 0.0), 1.0)
        return out

    def _merge_config(self, method, per_model, glob) -> MergeConfig:
        if self.spec.dataflow is not None and self.spec.dataflow.layers_from != MERGED:
            # a path of single models' layers merges nothing: the placeholder names the base
            return MergeConfig.from_dict({"merge_method": "passthrough", "models": [{"model": self.base_model}],
                                          "dtype": self.dtype}, source=self.spec.source)
        accepts = self._accepts[method]
        params = {k: v for k, v in {**self.spec.parameters, **glob}.items() if k in accepts}
        per_model = {m: {k: v for k, v in p.items() if k in accepts} for m, p in per_model.items()}
        entries = tuple(ModelEntry(m, dict(per_model.get(m, {}))) for m in self.models)
        data = {
            "merge_method": method,
            "base_model": self.base_model,
            "models": [{"model": e.model, "parameters": e.parameters} for e in entries],
            "parameters": params,
            "dtype": self.dtype,
        }
        return MergeConfig.from_dict(data, source=self.spec.source)

    def _check(self, genome) -> np.ndarray:
        arr = np.asarray(genome, dtype=np.float64)
        if arr.shape != (self.dim,):
            raise ValueError(f"genome has shape {arr.shape}, space {self.spec.name} has {self.dim} genes")
        return arr


def _squeeze(values):
    """One layer group is a scalar (mergekit's plain value); several are a gradient list."""
    if not isinstance(values, list):
        return values
    return values[0] if len(values) == 1 else list(values)
