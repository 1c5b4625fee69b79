"""MergeConfig: mergekit YAML shape, validation errors that name the field and file."""

import pytest
import yaml

from evo.core.errors import EvoError
from evo.merge import METHODS, MergeConfig, ModelEntry

TIES_YAML = """
merge_method: ties
base_model: org/base
models:
  - model: org/base
  - model: org/math
    parameters:
      weight: [0.2, 0.8, 0.5]
      density: 0.5
  - model: org/code
    parameters:
      weight:
        - filter: mlp
          value: 0.7
        - value: 0.3
      density: 0.6
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""


def test_yaml_round_trip(tmp_path):
    src = tmp_path / "ties.yaml"
    src.write_text(TIES_YAML)
    cfg = MergeConfig.from_yaml(src)
    assert cfg.merge_method == "ties" and cfg.base_model == "org/base" and cfg.dtype == "bfloat16"
    assert cfg.models[0] == ModelEntry("org/base", {})
    assert cfg.to_dict() == {k: v for k, v in yaml.safe_load(TIES_YAML).items()} | {
        "models": [{"model": "org/base"}] + yaml.safe_load(TIES_YAML)["models"][1:]}
    out = tmp_path / "again.yaml"
    cfg.to_yaml(out)
    again = MergeConfig.from_yaml(out)
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("patch, message", [
    ({"merge_method": "tiez"}, "unknown merge_method 'tiez'"),
    ({"merge_method": None}, "missing field 'merge_method'"),
    ({"models": []}, "missing field 'models'"),
    ({"parameters": {"densty": 0.5}}, "unknown parameter 'densty'"),
    ({"models": [{"model": "a", "parameters": {"normalize": True}}]}, "'normalize' is global"),
    ({"models": [{"model": "a", "parameters": {"weight": "heavy"}}]}, r"models\[0\].parameters.weight"),
    ({"models": [{"parameters": {}}]}, r"models\[0\]: missing field 'model'"),
    ({"base_model": None}, "needs a base_model"),
    ({"dtype": "float8"}, "dtype 'float8'"),
    ({"slices": []}, "give 'models' or 'slices', not both"),
])
def test_validation_errors_name_field_and_source(patch, message):
    d = {"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}
    d.update(patch)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(EvoError, match=message) as err:
        MergeConfig.from_dict(d, source="recipe.yaml")
    assert "recipe.yaml" in str(err.value) and "\n" not in str(err.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(EvoError, match="cannot read"):
        MergeConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [ties\n")
    with pytest.raises(EvoError, match=r"bad.yaml(:\d+)?: not valid YAML"):
        MergeConfig.from_yaml(bad)


def test_every_method_declares_its_parameters():
    for name, method in METHODS.items():
        assert method.name == name
        assert len({p.name for p in method.params}) == len(method.params)
