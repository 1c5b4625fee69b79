"""Search space: encode/decode round trips, recipe decoding, and one-line errors on bad YAML."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from evo.core.errors import EvoError
from evo.search.space import SearchSpace, SearchSpaceSpec

from evo.search.genes import CategoricalGene, FloatGene, IntGene, gene_from_spec
SPACES = sorted(Path(__file__).resolve().parents[1].joinpath("search_spaces").rglob("*.yaml"))


def test_float_gene_round_trip_and_bounds():
    g = FloatGene(0.2, 1.4)
    for v in (0.2, 0.5, 1.4):
        assert g.decode(g.encode(v)) == pytest.approx(v)
    assert g.decode(-3) == 0.2 and g.decode(7) == 1.4  # clipped to bounds


def test_log_float_gene_is_geometric():
    g = FloatGene(1e-5, 1e-1, log=True)
    assert g.decode(0.5) == pytest.approx(1e-3)
    assert g.decode(g.encode(3e-4)) == pytest.approx(3e-4)


def test_int_gene_bins_cover_every_value_equally():
    g = IntGene(2, 5)
    counts = np.bincount([g.decode(u) for u in np.linspace(0, 1, 4001)], minlength=6)[2:]
    assert counts.min() > 950 and counts.max() < 1050
    assert all(g.decode(g.encode(v)) == v for v in range(2, 6))


def test_log_int_gene_round_trip():
    g = IntGene(4, 64, log=True)
    assert all(g.decode(g.encode(v)) == v for v in (4, 8, 16, 33, 64))


def test_categorical_gene_round_trip():
    g = CategoricalGene(("q_proj", "all", "mlp"))
    assert [g.decode(g.encode(c)) for c in g.choices] == list(g.choices)
    assert g.decode(1.0) == "mlp" and g.decode(0.0) == "q_proj"


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"type": "gaussian", "low": 0, "high": 1}, "unknown gene type 'gaussian'"),
        ({"type": "float", "low": 2, "high": 1}, "low (2.0) > high (1.0)"),
        ({"type": "float", "low": 0}, "high"),
        ({"type": "float", "low": 0, "high": 1, "lo": 3}, "unknown key"),
    ],
)
def test_bad_gene_specs(spec, needle):
    with pytest.raises((ValueError, KeyError)) as info:
        gene_from_spec(spec)
    assert needle in str(info.value)


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_every_shipped_space_loads_and_round_trips(path):
    """Contract test over every YAML under search_spaces/ (recursively)."""
    space = SearchSpace.load(path, ["en", "de", "code"], "base", num_layers=4)
    assert space.dim > 0
    rng = np.random.default_rng(0)
    for _ in range(5):
        genome = rng.random(space.dim)
        recipe = space.decode(genome)
        again = space.decode(space.encode(recipe))
        assert again.key() == recipe.key()  # decode(encode(recipe)) is the recipe itself
        recipe.mergekit()  # a valid mergekit config (slices for a data-flow path)
        if space.spec.dataflow is not None:
            assert recipe.path.num_layers == 4
            assert {s.model for s in recipe.path.steps} <= set(space.path_choices[1:])
        if space.spec.dataflow is None or space.spec.dataflow.layers_from == "merged":
            assert recipe.merge.base_model == "base"
            assert [e.model for e in recipe.merge.models] == ["en", "de", "code"]


def test_layerwise_decode_gives_gradient_lists(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sort_keys=False, data={
        "merge_method": "ties", "layer_groups": 3, "parameters": {"normalize": True},
        "genes": {"weight": {"type": "float", "low": 0, "high": 2, "scope": "model_layer"},
                  "density": {"type": "float", "low": 0.5, "high": 0.5, "scope": "model"},
                  "lambda": {"type": "float", "low": 1, "high": 3}},
    }))
    space = SearchSpace.load(path, ["a", "b"], "base")
    assert space.dim == 2 * 3 + 2 + 1
    assert space.labels[:3] == ["weight/a/g0", "weight/a/g1", "weight/a/g2"]
    genome = np.array([0, 0.5, 1, 0.25, 0.25, 0.25, 0.3, 0.9, 0.5])
    recipe = space.decode(genome)
    a, b = recipe.merge.models
    assert a.parameters["weight"] == pytest.approx([0.0, 1.0, 2.0])
    assert b.parameters["weight"] == pytest.approx([0.5, 0.5, 0.5])
    assert a.parameters["density"] == 0.5
    assert recipe.merge.parameters == {"normalize": True, "lambda": pytest.approx(2.0)}
    assert recipe.key() == space.decode(genome.copy()).key()
    assert recipe.key() != space.decode(np.r_[genome[:-1], 0.6]).key()


def test_categorical_method_and_lora_genes(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sort_keys=False, data={
        "genes": {"merge_method": {"type": "categorical", "choices": ["ties", "task_arithmetic"]},
                  "weight": {"type": "float", "low": 0, "high": 1, "scope": "model"},
                  "lora.rank": {"type": "int", "low": 4, "high": 16, "log": True},
                  "lora.lr": {"type": "logfloat", "low": 1e-5, "high": 1e-2}},
    }))
    space = SearchSpace.load(path, ["a"], "base")
    r = space.decode([0.9, 0.5, 0.0, 1.0])
    assert r.merge.merge_method == "task_arithmetic"
    assert r.lora == {"rank": 4, "lr": pytest.approx(1e-2)}


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"merge_method": "ties", "genes": {"w": {"type": "beta", "low": 0, "high": 1}}}, "genes.w: unknown gene type 'beta'"),
        ({"merge_method": "ties", "genes": {"w": {"type": "float", "low": 1, "high": 0}}}, "genes.w: low (1.0) > high (0.0)"),
        ({"merge_method": "ties", "genes": {"w": {"type": "float", "low": 1}}}, "genes.w.high: missing field"),
        ({"merge_method": "ties", "genes": {"w": {"low": 0, "high": 1}}}, "genes.w.type: missing field"),
        ({"merge_method": "ties"}, "field 'genes' is missing"),
        ({"genes": {"w": {"type": "float", "low": 0, "high": 1}}}, "field 'merge_method' is missing"),
        ({"merge_method": "ties", "genes": {"w": {"type": "float", "low": 0, "high": 1, "scope": "row"}}}, "genes.w.scope: unknown scope"),
        ({"merge_method": "ties", "layer_groups": 0, "genes": {"w": {"type": "float", "low": 0, "high": 1}}}, "layer_groups"),
        ({"merge_method": "ties", "gnes": {}}, "unknown field(s) gnes"),
    ],
)
def test_malformed_space_gives_one_line_error_naming_file_and_field(tmp_path, data, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EvoError) as info:
        SearchSpaceSpec.from_yaml(path)
    msg = str(info.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_unknown_merge_method_is_refused_before_loading_models(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sort_keys=False, data={"merge_method": "frankenmerge", "genes": {"w": {"type": "float", "low": 0, "high": 1}}}))
    with pytest.raises(EvoError, match="unknown method 'frankenmerge'"):
        SearchSpace.load(path, ["a"], "base")


def test_invalid_yaml_syntax(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("genes: [unclosed\n")
    with pytest.raises(EvoError, match="not valid YAML"):
        SearchSpaceSpec.from_yaml(path)


def test_method_gene_drops_parameters_the_chosen_method_does_not_take(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sort_keys=False, data={
        "genes": {"merge_method": {"type": "categorical", "choices": ["slerp", "ties"]},
                  "density": {"type": "float", "low": 0.2, "high": 0.2, "scope": "model"},
                  "t": {"type": "float", "low": 0, "high": 1}},
    }))
    space = SearchSpace.load(path, ["a"], "base")
    slerp = space.decode([0.1, 0.5, 0.5])
    ties = space.decode([0.9, 0.5, 0.5])
    assert slerp.merge.parameters == {"t": 0.5} and "density" not in slerp.merge.models[0].parameters
    assert "t" not in ties.merge.parameters and ties.merge.models[0].parameters["density"] == 819 / 4096  # 0.2 on the 1/4096 grid


def test_parameter_no_method_takes_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "genes": {"densty": {"type": "float", "low": 0, "high": 1}}}))
    with pytest.raises(EvoError, match="genes.densty: no merge method of this space takes"):
        SearchSpace.load(path, ["a"], "base")


def test_a_gene_with_no_effect_for_the_method_warns_once_naming_it(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"name": "ta", "merge_method": "task_arithmetic", "layer_groups": 2,
                                    "genes": {"weight": {"type": "float", "low": 0.0, "high": 1.0, "scope": "model_layer"},
                                              "density": {"type": "float", "low": 0.1, "high": 1.0, "scope": "model"}}}))
    with pytest.warns(UserWarning, match=r"genes\.density: has no effect with merge method task_arithmetic"):
        SearchSpace.load(path, ["a", "b"], "base")
    # with ties, density prunes: no warning
    data = yaml.safe_load(path.read_text())
    data["merge_method"] = "ties"
    path.write_text(yaml.safe_dump(data))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SearchSpace.load(path, ["a", "b"], "base")
