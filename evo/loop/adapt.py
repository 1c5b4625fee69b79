"""The version's adaptation, done once: ``stream.adapters`` fitted on the newest data, then merged.

With ``stream.adapters`` a stream run does not fit a LoRA for every candidate (``lora.*`` genes,
one fit per candidate, the cost of the loop). Instead, when a data version is installed, each
configured adapter (fixed LoRA settings: rank, learning rate, steps, rehearsal share) is fitted
**once**, starting from the current release, on the version's training split plus the rehearsal
pool. Its weight change (the LoRA folded into the weights, minus the release it started from) is
written on top of the **base** as a plain model directory, ``adapters/<version>@<release>/<name>/``,
so its task vector is the step alone. The search then merges ``{specialists, release, adapters}``
and a candidate costs a merge and a forward pass, not a fit: ``release·1 + adapter·1`` is
sequential LoRA with rehearsal; ``adapter·t`` with t ≠ 1 tunes the step after the fit (shorter:
less drift; longer: more adaptation), the specialists' weights blend back what they know, and the
release rule must prefer the result on the newest held-out text while guarding every older stratum.

The fit runs in the driver, between versions, while the evaluators wait for the new version:
with one adapter there is nothing for them to do in parallel, and the driver may use every core.
A finished fit is reused on resume (its directory holds ``evo_adapter.json``), so a resumed run
merges exactly the weights the interrupted one evaluated.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from evo.core.fs import staged_dir
from evo.core.config import ExperimentConfig
from evo.core.errors import EvoError
from evo.scoring.lora import LoraGenes, TrainingData, fit_lora, merged_state_dict, unload

MARKER = "evo_adapter.json"  # written last into an adapted model's directory: the fit is complete
RESERVED = ("base", "release")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of ``stream.adapters``: its name among the merge's models, and its LoRA settings."""

    name: str
    genes: LoraGenes


def adapter_specs(cfg: ExperimentConfig) -> list[AdapterSpec]:
    """``stream.adapters`` validated (one-line errors naming the field); empty when unset."""
    specs = []
    for name, genes in (cfg.stream.adapters or {}).items():
        where = f"{cfg.source}: stream.adapters.{name}"
        if name in RESERVED or name in cfg.models.sources:
            raise EvoError(f"{where}: the name {name!r} is taken (base, release and the source models are reserved)")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise EvoError(f"{where}: a name of letters, digits, '-' and '_' is required")
        try:
            specs.append(AdapterSpec(name, LoraGenes.from_dict(genes, source=where)))
        except EvoError as exc:
            raise EvoError(str(exc)) from None
    return specs


def fit_adapter(spec: AdapterSpec, start_dir: str | Path, train: TrainingData, out_dir: str | Path, *, seed: int,
                base_dir: str | Path, threads: int | None = None) -> dict:
    """Fit ``spec`` on ``train`` starting from the model in ``start_dir``; write ``base + (adapted −
    start)`` (float32 safetensors) to ``out_dir`` atomically: a model whose task vector against
    ``base_dir`` is the adapter's weight change alone.

    Returns the fit's record (``evo_adapter.json``): genes, seed, start model, loss at start and
    end, trainable parameters, rehearsal share, seconds and CPU-seconds. An ``out_dir`` that holds
    a finished fit is returned as is (resume).
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / MARKER).is_file():
        return json.loads((out / MARKER).read_text(encoding="utf-8"))
    t0, c0 = time.perf_counter(), time.process_time()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(start_dir, dtype=torch.float32, trust_remote_code=False)
        peft_model, stats = fit_lora(model, train, spec.genes, seed=seed)
        adapted = merged_state_dict(peft_model)
        start = unload(peft_model).state_dict()  # the very tensors it started from (unload keeps them)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=False)
        with torch.no_grad():  # named_parameters lists tied weights once: each step is added once
            for name, param in model.named_parameters():
                param.add_(adapted[name] - start[name])
        record = {"name": spec.name, "genes": spec.genes.to_dict(), "seed": seed, "start": str(start_dir),
                  "holds": "base + (start + LoRA − start): the adapter's weight change on top of the base",
                  **{k: v for k, v in stats.items() if k != "seconds"}, "fit_seconds": round(stats["seconds"], 2),
                  "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2)}
        # an existing folder without the marker (an interrupted write of an older process) is replaced
        with staged_dir(out, replace=True) as staging:
            model.save_pretrained(str(staging), safe_serialization=True)
            (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return record
    except EvoError:
        raise
    except (OSError, ValueError, FloatingPointError) as exc:
        raise EvoError(f"stream.adapters.{spec.name}: fit from {start_dir} failed: {type(exc).__name__}: {exc}") from None
    finally:
        torch.set_num_threads(before)
