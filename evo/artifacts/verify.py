"""``evo verify``: a release checked from its own files alone: the manifest, a load with plain
``transformers``, and every objective re-measured on the data its fitness.json records.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from evo.core.errors import EvoError
from evo.artifacts.manifest import verify_manifest


def _check_depth(root: Path, model) -> None:
    """A data-flow release has as many layers as its recipe's path (it may differ from the base's)."""
    try:
        recipe = yaml.safe_load((root / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return  # the manifest already vouched for the files; an older release may have no recipe
    steps = ((recipe.get("path") or {}).get("steps") or []) if isinstance(recipe, dict) else []
    depth = getattr(model.config, "num_hidden_layers", None)
    if steps and depth != len(steps):
        raise EvoError(f"{root / 'config.json'}: num_hidden_layers is {depth}, the recipe's path has {len(steps)} layers")


def verify(release: str | Path, tolerance: float = 1e-3) -> dict[str, float]:
    """Check the manifest, load the model with plain transformers, and re-measure every
    objective on the recorded data. Returns the re-measured values; raises EvoError otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evo.core.config import Objective
    from evo.data.text import data_version, read_texts
    from evo.data.tokens import token_blocks
    from evo.scoring.fitness import mean_nll, objective_values

    root = Path(release)
    if not root.is_dir():
        raise EvoError(f"{root}: release directory not found")
    verify_manifest(root)
    try:
        fitness = json.loads((root / "fitness.json").read_text(encoding="utf-8"))
        ev = fitness["eval"]
        if not isinstance(fitness.get("objectives"), dict) or not isinstance(fitness.get("objective_specs"), list):
            raise KeyError("objectives")
    except FileNotFoundError:
        raise EvoError(f"{root / 'fitness.json'}: missing (the release records its fitness there)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvoError(f"{root / 'fitness.json'}: not valid JSON ({exc})") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise EvoError(f"{root / 'fitness.json'}: missing field {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=False).eval()
        tokenizer = AutoTokenizer.from_pretrained(root, trust_remote_code=False)
        if (root / "adapter" / "adapter_config.json").is_file():  # `--lora adapter`: measured with it applied
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, root / "adapter").eval()
    except Exception as exc:  # any load failure is a broken release
        raise EvoError(f"{root}: model does not load ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    _check_depth(root, model)
    if fitness.get("eval_blocks"):  # a stream release carries the exact blocks it was measured on
        from safetensors.numpy import load_file

        try:
            blocks = load_file(str(root / fitness["eval_blocks"]))
        except Exception as exc:
            raise EvoError(f"{root / fitness['eval_blocks']}: unreadable ({type(exc).__name__})") from None
        metrics = {f"logppl/{name}": mean_nll(model, torch.from_numpy(b), batch_size=ev["batch_size"])
                   for name, b in blocks.items()}
        set_names = list(blocks)
    else:
        inputs = fitness.get("data_inputs") or {"files": list(ev["sets"].values()),
                                                 "settings": dict(seq_len=ev["seq_len"], max_blocks=ev["max_blocks"])}
        for path in inputs["files"]:
            if not Path(path).is_file():
                raise EvoError(f"{path}: recorded evaluation data is missing")
        version = data_version(inputs["files"], **inputs["settings"], tokenizer=tokenizer.vocab_size)
        if version != fitness["data_version"]:
            raise EvoError(f"{root}: evaluation data changed since export ({version} != {fitness['data_version']})")
        metrics = {
            f"logppl/{name}": mean_nll(model, token_blocks(read_texts(path), tokenizer, ev["seq_len"], ev["max_blocks"]),
                                       batch_size=ev["batch_size"])
            for name, path in ev["sets"].items()
        }
        set_names = list(ev["sets"])
    tasks = ev.get("tasks") or {}
    if tasks:
        from evo.scoring.tasks import load_task

        for name, path in tasks.items():
            path = Path(path) if Path(path).is_absolute() else root / path  # copied into the release
            if not path.is_file():
                raise EvoError(f"{path}: recorded task file is missing")
            task = load_task(path, tokenizer, limit=ev.get("task_limit"))
            metrics[f"task/{name}"] = task.score(model, batch_size=ev["batch_size"])["value"]
    objectives = [Objective(**o) for o in fitness["objective_specs"]]
    values = objective_values(metrics, objectives, set_names, list(tasks))
    for obj, value in zip(objectives, values):
        recorded = fitness["objectives"][obj.name]["value"]
        if not abs(value - recorded) <= tolerance:
            raise EvoError(f"{root}: objective {obj.name} re-measured {value:.6f}, recorded {recorded:.6f} (tolerance {tolerance})")
    return dict(zip([o.name for o in objectives], values))
