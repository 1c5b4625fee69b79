"""Data-flow space (evo.search.dataflow, evo.scoring.path): a path is scored without building its
model, and the model its mergekit form builds (evo merge, mergekit-yaml) scores the same."""
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import mergekit_yaml_tensors, write_llama
from evo.core.errors import EvoError
from evo.merge import load_model_dir, merge_to_dir, task_vectors
from evo.scoring.evaluator import Evaluator
from evo.core.tensors import to_numpy
from evo.scoring.fitness import block_nlls
from evo.search.dataflow import LayerPath
from evo.search.space import SearchSpace, SearchSpaceSpec

from evo.search.recipe import Recipe
MODELS_SPACE = {"name": "df", "dataflow": {"layers_from": "models", "repeats": 2, "scale": {"low": 0.5, "high": 1.5}}}
MERGED_SPACE = {"name": "both", "merge_method": "ties", "layer_groups": 2, "parameters": {"normalize": True},
                "genes": {"weight": {"type": "float", "low": 0.0, "high": 1.0, "scope": "model_layer"},
                          "density": {"type": "float", "low": 0.2, "high": 1.0, "scope": "model"}},
                "dataflow": {"layers_from": "merged", "repeats": 2}}
SPACES = {"models": MODELS_SPACE, "merged": MERGED_SPACE}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def zoo(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("df_zoo")
    for i, name in enumerate(["base", "a", "b"]):
        write_llama(root / name, i, num_hidden_layers=3, tie_word_embeddings=request.param)
    return root


@pytest.fixture(scope="module")
def evaluator(zoo):
    base, config = load_model_dir(zoo / "base")
    deltas = task_vectors(base, {m: load_model_dir(zoo / m)[0] for m in ("a", "b")})
    return Evaluator(to_numpy(base), {m: to_numpy(d) for m, d in deltas.items()}, config.to_dict())


def _space(which: str) -> SearchSpace:
    return SearchSpace(SearchSpaceSpec.from_dict(SPACES[which]), ["a", "b"], "base", num_layers=3)


def _blocks():
    return torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("which", sorted(SPACES))
def test_path_scores_equal_the_model_its_mergekit_form_builds(zoo, evaluator, tmp_path, which):
    from transformers import AutoModelForCausalLM

    space, rng, depths = _space(which), np.random.default_rng(1), set()
    for k in range(3):
        recipe = space.decode(rng.random(space.dim))
        got = evaluator.block_scores(recipe.to_dict(), {"x": _blocks()})["x"]
        merge_to_dir(recipe.mergekit(), tmp_path / str(k), resolve=lambda n: zoo / n)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / str(k)).eval()
        assert model.config.num_hidden_layers == len(recipe.path.steps)
        depths.add(len(recipe.path.steps))
        # scales: the hook scales the projections' outputs, mergekit their weights (rounding only)
        np.testing.assert_allclose(got, block_nlls(model, _blocks()).numpy(), rtol=0, atol=1e-5)
    assert len(depths) > 1 and max(depths) > 3  # the paths changed the depth, some beyond the models'
    shell = evaluator.model  # restored after every path: its own layers, depth and cache setting
    assert len(shell.model.layers) == 3 and shell.config.num_hidden_layers == 3
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in shell.model.layers)


def test_identity_path_scores_as_the_plain_merge(evaluator):
    space = _space("merged")
    genome = space.uniform_genome(weight=0.4, density=0.7)
    with_path = space.decode(genome)
    plain = Recipe(with_path.merge, None, with_path.seed)
    assert [s.layer for s in with_path.path.steps] == [0, 1, 2]
    a = evaluator.block_scores(with_path.to_dict(), {"x": _blocks()})["x"]
    b = evaluator.block_scores(plain.to_dict(), {"x": _blocks()})["x"]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("which", sorted(SPACES))
def test_mergekit_yaml_builds_the_same_tensors(zoo, tmp_path, which):
    """The decoded recipe is a plain mergekit config: mergekit-yaml writes evo merge's tensors."""
    space = _space(which)
    recipe = space.decode(np.random.default_rng(2).random(space.dim))
    mk = recipe.mergekit().to_dict()
    text = yaml.safe_dump(mk)
    for m in ("base", "a", "b"):
        text = text.replace(f"model: {m}\n", f"model: {zoo / m}\n").replace(f"base_model: {m}\n", f"base_model: {zoo / m}\n")
    (tmp_path / "mk.yaml").write_text(text)
    ref = mergekit_yaml_tensors(tmp_path / "mk.yaml", tmp_path / "mk_out")
    merge_to_dir(recipe.mergekit(), tmp_path / "ours", resolve=lambda n: zoo / n)
    got = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ref) == set(got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6, msg=name)


def test_genome_path_roundtrip_and_recipe_yaml():
    space = _space("models")
    rng = np.random.default_rng(3)
    for _ in range(5):
        recipe = space.decode(rng.random(space.dim))
        assert space.decode(space.encode(recipe)) == recipe
        back = Recipe.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
        assert back == recipe and back.key() == recipe.key()
    ident = space.decode(space.identity_genome("a"))
    assert ident.mergekit().to_dict()["slices"] == [{"sources": [{"model": "a", "layer_range": [0, 3]}]}]
    assert Recipe(ident.merge, None, 0).key() != ident.key()  # the path is part of what is cached


@pytest.mark.parametrize("spec, message", [
    ({**MODELS_SPACE, "genes": {"weight": {"type": "float", "low": 0, "high": 1}}}, "takes no genes"),
    ({**MERGED_SPACE, "dataflow": {"layers_from": "merged", "scale": {"low": 0.5, "high": 1}}}, "only with layers_from: models"),
    ({**MERGED_SPACE, "genes": {**MERGED_SPACE["genes"], "lora.rank": {"type": "int", "low": 4, "high": 8}}}, "LoRA genes"),
    ({**MODELS_SPACE, "dataflow": {"layers_from": "everything"}}, "dataflow.layers_from"),
    ({**MODELS_SPACE, "dataflow": {"repeats": 9}}, "dataflow.repeats"),
    ({**MODELS_SPACE, "dataflow": {"layers": 2}}, "unknown field 'layers'"),
])
def test_bad_dataflow_spaces_are_refused_in_one_line(spec, message):
    with pytest.raises(EvoError, match=message) as err:
        SearchSpaceSpec.from_dict(spec, source="space.yaml")
    assert str(err.value).startswith("space.yaml: ") and "\n" not in str(err.value)


def test_bad_paths_are_refused_in_one_line():
    with pytest.raises(EvoError, match="steps\\[1\\].layer: 7 is outside 0..2"):
        LayerPath.from_dict({"num_layers": 3, "steps": [{"model": "a", "layer": 0}, {"model": "a", "layer": 7}]})
    with pytest.raises(EvoError, match="num_hidden_layers"):
        SearchSpace(SearchSpaceSpec.from_dict(MODELS_SPACE), ["a", "b"], "base")
    ties = Recipe.from_dict({"merge": {"merge_method": "dare_ties", "base_model": "base",
                                       "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}}]},
                             "path": {"num_layers": 3, "steps": [{"model": "merged", "layer": 0}]}})
    with pytest.raises(EvoError, match="random method 'dare_ties'"):
        ties.mergekit()


def test_a_path_naming_an_unknown_model_fails_as_a_candidate(evaluator):
    recipe = {"merge": {"merge_method": "passthrough", "models": [{"model": "base"}]},
              "path": {"num_layers": 3, "steps": [{"model": "zz", "layer": 0}]}}
    evaluator.eval_sets = {"valid": {"x": _blocks()}}
    out = evaluator.evaluate(recipe)
    assert out["status"] == "failed" and "'zz'" in out["error"]
    out = evaluator.evaluate({**recipe, "path": {"num_layers": 3, "steps": [{"model": "a", "layer": 0}]},
                              "lora": {"rank": 4}})
    assert out["status"] == "failed" and "LoRA" in out["error"]


def test_a_dataflow_run_exports_a_release_of_another_depth(micro_zoo, ray_session, tmp_path, repo_root):
    """evo run over the data-flow space on the micro zoo, then export the best evolved path: the
    release has its path's depth, passes evo verify, and its mergekit.yaml (portable names pointed
    back at the zoo) makes mergekit-yaml write the same tensors."""
    import evo
    from evo.artifacts.verify import verify

    space = yaml.safe_load((repo_root / "search_spaces" / "dataflow_layers.yaml").read_text())
    space["dataflow"]["repeats"] = 2
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    cfg = {"zoo": str(micro_zoo.root), "search_space": str(tmp_path / "space.yaml"), "seed": 1,
           "eval": {"seq_len": 32, "max_blocks": 4, "batch_size": 4},
           "optimizer": {"name": "random", "generations": 1, "population": 4, "start": "uniform",
                         "seed_baselines": False},
           "ray": {"evaluators": 2, "cpus_per_evaluator": 0.5}}
    evo.run(cfg, tmp_path / "run", quiet=True)
    release = evo.export(tmp_path / "run", tmp_path / "rel", candidate="best-evolved")
    recipe = Recipe.from_dict(yaml.safe_load((release / "recipe.yaml").read_text()))
    depth = json_load(release / "config.json")["num_hidden_layers"]
    assert recipe.path is not None and depth == len(recipe.path.steps)
    assert depth != recipe.path.num_layers  # random paths over two passes: another depth than the zoo's
    assert "data-flow path of" in (release / "README.md").read_text()
    verify(release)  # re-measured from the release's own weights with plain transformers

    assert shutil.which("mergekit-yaml"), "mergekit-yaml is a test dependency"
    text = (release / "mergekit.yaml").read_text().replace(f"{micro_zoo.root.name}/", f"{micro_zoo.root}/")
    (tmp_path / "mk.yaml").write_text(text)
    ref = mergekit_yaml_tensors(tmp_path / "mk.yaml", tmp_path / "mk_out")
    got = load_file(str(release / "model.safetensors"))
    assert set(ref) == set(got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6, msg=name)


def json_load(path):
    import json

    return json.loads(path.read_text())
