"""LoRA genes through the whole pipeline: evaluator fit + unload, run on Ray, export, verify."""
from __future__ import annotations

import json

import pytest
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

import evo
from evo.loop.experiment import load_config
from evo.core.errors import EvoError
from evo.scoring.evaluator import Evaluator
from evo.artifacts.verify import verify
from evo.loop.generation import make_space
from evo.scoring.sources import Sources


@pytest.fixture(scope="module")
def lora_config(micro_zoo, repo_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    space = yaml.safe_load((repo_root / "search_spaces" / "merge_lora.yaml").read_text())
    space["genes"]["lora.steps"] = {"type": "int", "low": 2, "high": 4, "scope": "global"}
    space["genes"]["lora.rank"] = {"type": "int", "low": 2, "high": 4, "scope": "global"}
    (root / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    return {
        "zoo": str(micro_zoo.root), "search_space": str(root / "space.yaml"), "seed": 2,
        "eval": {"seq_len": 32, "max_blocks": 4, "batch_size": 4, "train_blocks": 32},
        "optimizer": {"name": "ga", "generations": 2, "population": 3, "options": {"elites": 1}, "seed_baselines": False},
        "ray": {"evaluators": 2, "cpus_per_evaluator": 0.5},
    }


def test_lora_gene_changes_the_model_reproducibly_and_leaves_it_bare(lora_config):
    cfg = load_config(lora_config)
    sources = Sources.load(cfg)
    assert sources.train is not None and sources.train.shape[1] == 32
    ev = Evaluator(sources.base, sources.deltas, sources.model_config, sources.eval_sets, train=sources.train)
    space = make_space(cfg)
    genome = [0.4] * space.dim
    recipe = space.decode(genome)
    assert recipe.lora and recipe.lora["steps"] >= 2
    plain = recipe.merge
    from evo.search.recipe import Recipe

    before = ev.evaluate(Recipe(plain, None, recipe.seed).to_dict())
    tuned = ev.evaluate(recipe.to_dict())
    again = ev.evaluate(recipe.to_dict())
    after = ev.evaluate(Recipe(plain, None, recipe.seed).to_dict())
    assert tuned["status"] == "ok" and tuned["lora"]["steps"] == recipe.lora["steps"]
    assert tuned["metrics"] != before["metrics"]  # the adapter changed the model
    assert again["metrics"] == tuned["metrics"]  # same seed, same adapter
    assert after["metrics"] == before["metrics"]  # unloaded: the resident model is bare again
    other = Recipe(recipe.merge, recipe.lora, recipe.seed + 1)
    assert ev.evaluate(other.to_dict())["metrics"] != tuned["metrics"]


def test_lora_run_exports_merged_and_adapter_releases(lora_config, ray_session, tmp_path):
    result = evo.run(lora_config, tmp_path / "run", quiet=True)
    assert result.best_recipe.lora
    merged = evo.export(tmp_path / "run")
    verify(merged)  # re-measures the recorded fitness with the LoRA folded into the weights
    selection = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["selection"]
    if not selection["release_recipe"].get("lora"):  # a simple baseline was released: it has no adapter
        with pytest.raises(EvoError, match="no LoRA genes.*--candidate best-evolved"):
            evo.export(tmp_path / "run", lora="adapter")
    adapter = evo.export(tmp_path / "run", lora="adapter", candidate="best-evolved")
    assert (adapter / "adapter" / "adapter_config.json").is_file()
    card = json.loads((adapter / "fitness.json").read_text())
    assert card["release"]["label"] == selection["best_evolved"] and card["release"]["kind"] == "evolved"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter), adapter / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    verify(adapter)  # re-measured with the adapter applied: the recorded selection values
