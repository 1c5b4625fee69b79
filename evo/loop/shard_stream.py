"""A stream of shards: one data version per shard of ``stream.folder`` (``evo.data.stream``),
installed, re-evaluated, evolved and released by the release rule (the steps are described in
``evo.loop.versions``)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from evo.core.config import ExperimentConfig
from evo.data.stream import DataStream
from evo.core.errors import EvoError
from evo.core.records import CandidateRecord
from evo.loop.adapt import MARKER, adapter_specs, fit_adapter
from evo.loop.generation import RELEASE, make_stream_space
from evo.zoo.gguf import model_dirs
from evo.loop.selection import weights_recipe
from evo.scoring.sources import Sources, load_tokenizer, train_blocks
from evo.search.recipe import Recipe

from evo.loop.version_source import Installed, LoopView, VersionSource

log = logging.getLogger(__name__)

STREAM_STATE = "stream.json"
ADAPTER_STEPS = (1.0, 1.2, 0.75, 0.5)  # seeds per adapter: release + t·(the adapter's step)



class ShardStream(VersionSource):
    """One data version per shard of ``stream.folder``; released by the release rule."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.space = make_stream_space(cfg)
        self.adapters = adapter_specs(cfg)
        if self.adapters and any(g.startswith("lora.") for g in self.space.spec.genes):
            raise EvoError(f"{cfg.source}: stream.adapters: the search space {cfg.search_space} has lora.* genes; "
                           "with adapters fitted once per version use a merge-only space "
                           "(e.g. search_spaces/stream_adapters.yaml)")
        self.adapter_dirs: dict[str, str] = {}
        self.generations = cfg.stream.generations
        self.poll_s = cfg.stream.poll_s
        self.blocks: dict[str, np.ndarray] = {}
        self.train = None
        self.window = None

    def open(self, loop: LoopView, ckpt):
        cfg, st = self.cfg, self.cfg.stream
        tokenizer = load_tokenizer(cfg)
        self.stream = DataStream(st.folder, tokenizer, seq_len=cfg.eval.seq_len, heldout_frac=st.heldout_frac,
                                 replay_blocks=st.replay_blocks, seed=cfg.seed if st.split_seed is None else st.split_seed, min_chars=st.min_chars,
                                 near_dup_threshold=st.near_dup_threshold, order=st.order,
                                 state_path=loop.store.root / STREAM_STATE, replay_train_blocks=st.replay_train_blocks)
        self.sources = Sources.load(cfg, tokenizer)
        # the zoo's own training text is the oldest rehearsal stratum (never evaluation text)
        self.rehearses = st.train_replay > 0 or "lora.rehearsal" in self.space.spec.genes or \
            any(a.genes.rehearsal for a in self.adapters)
        prior_train = train_blocks(cfg, tokenizer) if cfg.eval.train_sets and self.rehearses else None
        self.prior_train = None if prior_train is None else _sample(
            prior_train, st.replay_train_blocks, np.random.default_rng([cfg.seed, 7]))
        # the static evaluation sets are the oldest data: they feed the replay sample
        self.prior = {k: b for k, b in self.sources.eval_sets.get("valid", {}).items() if len(b)}
        self.sources.eval_sets = {"valid": {}}
        for slot in (RELEASE, *(a.name for a in self.adapters)):  # filled per version by install
            self.sources.deltas[slot] = {k: np.zeros_like(v) for k, v in self.sources.base.items()}
        if ckpt is not None:
            return ckpt.stream
        return {"version": None, "shard": None, "phase": "done", "gen_in_version": 0,
                "release": None, "release_dir": None, "reference": None, "history": []}

    def describe(self, pool):
        return {"stream": self.cfg.stream.folder}

    def exhausted(self, state):
        return self.cfg.stream.max_versions is not None and len(state["history"]) >= self.cfg.stream.max_versions

    def install_key(self, state):
        return state["version"], state["release"]

    def checkpoint_fields(self, loop: LoopView):
        return {"stream": loop.state}

    def finish(self, loop: LoopView, result, stopped):
        st = loop.state
        loop.store.event("run_paused" if stopped else "stream_idle", versions=len(st["history"]), release=st["release"])
        result.releases = [h["release"] for h in st["history"] if h.get("released")]
        result.versions = list(st["history"])
        if not stopped and not st["history"]:
            result.outcome, result.reason = "no_data", f"no data version in {self.cfg.stream.folder} (no usable shard)"
        elif not stopped and result.best_recipe is None:
            result.outcome, result.reason = "all_failed", loop.store.first_failure()
        result.release_dir = st.get("release_dir")

    def next_version(self, loop: LoopView) -> bool:
        """Take the next data version (consuming at most one new one); False when none."""
        st = loop.state
        known = self.stream.versions
        if known and known[-1] != st["version"] and (st["version"] is None or st["version"] in known):
            pending = known[-1]  # consumed by a driver that died before checkpointing it
        else:
            for report in self.stream.poll(max_versions=1):
                loop.store.event("shard", **report.to_dict())
                if not loop.quiet:
                    if report.skipped:
                        print(f"shard {report.shard}: skipped ({report.skipped})")
                    else:
                        print(f"shard {report.shard}: {report.kept}/{report.docs} documents kept "
                              f"({report.duplicates} duplicates, {report.near_duplicates} near duplicates, "
                              f"{sum(report.rejected.values())} rejected), {report.tokens} tokens -> version {report.version}")
            known = self.stream.versions
            if not known or known[-1] == st["version"]:
                return False
            pending = known[-1]
        shard = next((s["name"] for s in self.stream.state()["shards"] if s["version"] == pending), None)
        st.update(version=pending, shard=shard, phase="reevaluate", gen_in_version=0, reference=None, seconds={})
        loop.checkpoint()
        return True

    def install(self, loop: LoopView) -> Installed | None:
        """Ship the version's evaluation and training blocks and the release's weights."""
        cfg, st = self.cfg, loop.state
        window = self.stream.window()
        if window.version != st["version"]:
            raise EvoError(f"{loop.store.root / STREAM_STATE}: stream is at version {window.version}, "
                           f"the checkpoint at {st['version']}; the stream state and checkpoint disagree")
        rng = np.random.default_rng([cfg.seed, int(window.version.rsplit("-", 1)[-1], 16)])
        if len(window.heldout) == 0 or len(window.train) == 0:
            msg = (f"version {window.version}: {len(window.train)} train and {len(window.heldout)} held-out blocks "
                   f"of {cfg.eval.seq_len} tokens; too small to adapt and evaluate, skipped")
            log.warning(msg)
            if not loop.quiet:
                print(msg)
            st["history"].append({"version": st["version"], "shard": st["shard"], "released": False,
                                  "release": st["release"], "decision": "skipped: too small"})
            st["phase"] = "done"
            loop.checkpoint()
            return None
        newest = _sample(window.heldout, cfg.eval.max_blocks, rng)
        # stratified: every older version and the static sets (as one stratum) get an equal share,
        # measured as sets of their own ("replay:<stratum>"): the "replay" objective is their mean,
        # and the release rule guards each one, so no older version may quietly pay for another
        if self.cfg.stream.prior == "per_set":
            strata = {f"prior:{k}": b for k, b in self.prior.items()}
        else:
            strata = {"prior": np.concatenate(list(self.prior.values()))} if self.prior else {}
        strata.update({v: b for v in window.versions[:-1] if len(b := self.stream.heldout(v))})
        share = max(1, cfg.stream.replay_blocks // max(1, len(strata)))
        replay = {f"replay:{k}": _sample(b, share, rng) for k, b in strata.items()} or {"replay:newest": newest}
        train, rehearsal = self._training_blocks(window, rng)
        deltas = {RELEASE: self._release_delta(loop)}
        if self.adapters:
            deltas.update(self._adapt(loop, train))
        self.blocks = {"newest": newest, **replay}
        # with adapters the candidates fit nothing: the evaluators need no training blocks
        loop.pool.update(eval_sets={"valid": self.blocks}, train=None if self.adapters else train, deltas=deltas)
        self.train = train
        data_key = f"{window.version}@{st['release'] or 'base'}"
        self.window = window
        n_replay = sum(len(b) for b in replay.values())
        loop.store.event("version_installed", version=window.version, shard=st["shard"], release=st["release"],
                              newest_blocks=len(newest), replay_blocks=n_replay, replay_strata=list(replay),
                              train_blocks=len(train), rehearsal_blocks=rehearsal)
        if not loop.quiet:
            print(f"\ndata version {window.version} (shard {st['shard']}): {len(newest)} held-out, "
                  f"{n_replay} replay ({len(replay)} strata) and {len(train)} training blocks "
                  f"(+{rehearsal} older ones to rehearse); "
                  f"release slot: {st['release'] or 'base'}")
        return Installed(data_key, list(self.blocks), extra={"stream_version": st["version"], "release_slot": st["release"]})

    def _training_blocks(self, window, rng):
        """The newest training split, plus older blocks to rehearse: an equal number from each
        older version's training split and the zoo's training text (never held-out text).

        Each LoRA batch draws a share of its blocks from the rehearsal pool: the recipe's
        ``lora.rehearsal`` gene where the search space has one, else ``stream.train_replay``.
        """
        from evo.scoring.lora import TrainingData

        cfg = self.cfg
        newest = _sample(window.train, cfg.eval.train_blocks, rng)
        older = [b for b in (self.stream.train_sample(v) for v in window.versions[:-1]) if len(b)]
        if self.prior_train is not None and len(self.prior_train):
            older.append(self.prior_train)
        if not older or not self.rehearses:
            return TrainingData(newest, None, cfg.stream.train_replay), 0
        each = cfg.stream.replay_train_blocks
        rehearsal = np.concatenate([_resample(b, each, rng) for b in older])
        return TrainingData(newest, rehearsal, cfg.stream.train_replay), len(rehearsal)

    def _adapt(self, loop: LoopView, train) -> dict[str, dict[str, np.ndarray]]:
        """Fit each of ``stream.adapters`` once on this version, from the current release
        (``evo.loop.adapt``); their task vectors go to the evaluators as source models."""
        st, cfg = loop.state, self.cfg
        start = st["release_dir"] or model_dirs(cfg.models)["base"]
        folder = loop.store.root / "adapters" / f"{st['version']}@{st['release'] or 'base'}"
        threads = max(1, cfg.ray.evaluators * cfg.ray.threads_per_evaluator)
        deltas = {}
        for i, spec in enumerate(self.adapters):
            if not loop.quiet:
                print(f"adapting {spec.name} on version {st['version']} from {st['release'] or 'base'} "
                      f"(rank {spec.genes.rank}, lr {spec.genes.lr:g}, {spec.genes.steps} steps, "
                      f"rehearsal {spec.genes.rehearsal if spec.genes.rehearsal is not None else cfg.stream.train_replay:g})",
                      flush=True)
            seed = cfg.seed + 1000 * len(st["history"]) + i
            record = fit_adapter(spec, start, train, folder / spec.name, seed=seed, threads=threads,
                                 base_dir=model_dirs(cfg.models)["base"])
            self.adapter_dirs[spec.name] = str(folder / spec.name)
            deltas[spec.name] = self._model_delta(folder / spec.name)
            loop.store.event("adapted", version=st["version"], release=st["release"], adapter=spec.name,
                             **{k: record.get(k) for k in ("loss_start", "loss_end", "steps", "rehearsal_share",
                                                           "seconds", "cpu_seconds")})
            if not loop.quiet:
                print(f"  {spec.name}: loss {record['loss_start']:.3f} -> {record['loss_end']:.3f} "
                      f"in {record['seconds']:.0f}s", flush=True)
        return deltas

    def _release_delta(self, loop: LoopView) -> dict[str, np.ndarray]:
        if not loop.state["release_dir"]:
            return {k: np.zeros_like(v) for k, v in self.sources.base.items()}
        return self._model_delta(loop.state["release_dir"])

    def _model_delta(self, model_dir) -> dict[str, np.ndarray]:
        """The model in ``model_dir`` minus the base, in the sources' dtype."""
        base = self.sources.base
        from evo.merge import load_model_dir

        weights, _ = load_model_dir(model_dir)
        missing = [k for k in base if k not in weights]
        if missing:
            raise EvoError(f"{model_dir}: tensor {missing[0]} is missing (present in the base)")
        import torch

        from evo.core.tensors import DTYPES, float32_array, to_numpy

        # δ in float32 against the stored base, rounded once into the sources' dtype
        store = DTYPES[self.cfg.dtype]
        return to_numpy({k: (weights[k].float() - torch.from_numpy(float32_array(v))).to(store) for k, v in base.items()})

    def reference_recipe(self) -> Recipe:
        """The current release exactly (the base before the first release), no LoRA."""
        return weights_recipe(self.cfg, {RELEASE: 1.0})

    def reevaluate(self, loop: LoopView) -> None:
        st, step = loop.state, loop.step
        tag = f"v{len(st['history']):04d}"
        remembered = loop.optimizer.remembered()
        named = {f"{tag}-reference": self.reference_recipe()}
        genomes = {}
        for i, e in enumerate(remembered):
            try:
                named[f"{tag}-r{i:03d}"] = self.space.decode(e.genome)
                genomes[f"{tag}-r{i:03d}"] = e
            except EvoError:
                continue
        keys, fresh = step.evaluate(named, desc=f"re-evaluation ({st['version']})", should_stop=loop.stop.requested)
        rescored = {}
        for name, key in keys.items():
            result = loop.cache[key]
            values = step.values(result)
            old = genomes.get(name)
            if old is not None:
                rescored[tuple(map(float, old.genome))] = values
            loop.store.record_candidate(CandidateRecord(
                generation=loop.optimizer.generation, candidate=name, parents=[old.id] if old and old.id else [],
                key=key, cached=key not in fresh, status=result["status"], error=result.get("error"),
                values=values, metrics=result.get("metrics"), recipe=named[name].to_dict(),
                genome=list(map(float, old.genome)) if old else None, data_version=loop.data_key,
                extra={"previous_values": old.values if old else None, "stream_version": st["version"],
                       "release_slot": st["release"], "reevaluated": True, "reference": old is None}))
        loop.optimizer.rescore(rescored)
        ref = loop.cache[keys[f"{tag}-reference"]]
        st["reference"] = {"key": keys[f"{tag}-reference"], "values": step.values(ref)}
        seeds = []
        for spec in self.adapters:
            # release + t·step: t = 1 is sequential LoRA with rehearsal; shorter steps drift less (the
            # guard may accept them where the full step forgets a stratum by a little too much),
            # a longer one adapts more where the fit stopped short
            for t in ADAPTER_STEPS:
                seeds.append(self.space.uniform_genome(per_model={spec.name: {"weight": t}, RELEASE: {"weight": 1.0}},
                                                       weight=0.0, density=1.0))
        if st["release"]:  # "release + LoRA on the newest data": the sequential fine-tune, as a candidate
            release_only = {"per_model": {RELEASE: {"weight": 1.0}}, "weight": 0.0, "density": 1.0}
            shipped = self._shipped_lora(loop)
            if shipped:  # warm start: the LoRA genes that made the current release
                seeds.append(self.space.uniform_genome(**release_only, **shipped))
            seeds.append(self.space.uniform_genome(**release_only))
        best = loop.optimizer.best()
        if best is not None and best.values is not None:
            seeds.append(np.asarray(best.genome))
        loop.optimizer.inject(seeds)
        loop.store.event("reevaluated", version=st["version"], candidates=len(rescored),
                         reference=st["reference"]["values"], release=st["release"])
        if not loop.quiet and st["reference"]["values"]:
            what = st["release"] or "base"
            vals = ", ".join(f"{n}={v:.4f}" for n, v in zip(loop.objective_names, st["reference"]["values"]))
            print(f"re-evaluated {len(rescored)} remembered candidates; {what} on this version: {vals}")

    def _shipped_lora(self, loop: LoopView) -> dict:
        """``lora.*`` gene values of the candidate the current release was made from."""
        name = next((h.get("candidate") for h in reversed(loop.state["history"]) if h.get("released")), None)
        if name is None:
            return {}
        recipe = next((c["recipe"] for c in reversed(loop.store.candidates())
                       if c["candidate"] == name and c.get("recipe")), {})
        genes = self.space.spec.genes
        return {f"lora.{k}": v for k, v in (recipe.get("lora") or {}).items() if f"lora.{k}" in genes and v is not None}

    def release(self, loop: LoopView) -> None:
        """Apply the release rule to every candidate evaluated on this version; export if met."""
        from evo.loop.release_rule import decide

        cfg, st = self.cfg, loop.state
        ref = (st.get("reference") or {}).get("values")
        ref_metrics = loop.cache[st["reference"]["key"]].get("metrics", {}) if st.get("reference") else {}
        candidates = [c for c in loop.store.candidates()
                      if c.get("data_version") == loop.data_key and c.get("status") == "ok" and c.get("values")
                      and not c.get("reference")]
        anchored = cfg.release.guard == "anchored"
        d = decide(cfg, candidates, ref, ref_metrics, first=not st["release"], drift=st.get("drift"))
        entry = {"version": st["version"], "shard": st["shard"], "released": False, "release": st["release"],
                 "reference": ref, "rule": d.rule, "decision": d.decision}
        if d.candidate is not None:
            entry["candidate"] = d.candidate["candidate"]
        objective = next(o for o in cfg.objectives if o.name == cfg.release_objectives()[0])
        entry["gain"] = _gain(ref, d.candidate, loop.objective_names.index(objective.name), objective.goal)
        if d.release:
            t0 = time.perf_counter()
            out = self._export(loop, d.candidate, d.rule, d.drift if anchored else None)
            st.setdefault("seconds", {})["export"] = round(time.perf_counter() - t0, 2)
            entry.update(released=True, release=out.name, values=d.candidate["values"], decision=f"released {out.name}")
            st["release"], st["release_dir"] = out.name, str(out)
            if anchored:
                st["drift"] = entry["drift"] = d.drift
        # where this version's time went (the release step itself is added by the loop after this)
        entry["seconds"] = dict(st.get("seconds") or {})
        st["history"].append(entry)
        loop.store.event("release" if entry["released"] else "release_skipped", **entry)
        if loop.metrics is not None:
            loop.metrics.version_done(entry)
        if not loop.quiet:
            print(f"version {st['version']}: {entry['decision']}")

    def _export(self, loop: LoopView, cand: dict, rule: str, drift: dict | None) -> Path:
        from evo.artifacts.fitness import fitness_record
        from evo.artifacts.release import next_release_dir, write_release

        cfg, st = self.cfg, loop.state
        recipe = Recipe.from_dict(cand["recipe"], source=f"candidate {cand['candidate']}")
        paths = model_dirs(cfg.models)
        paths[RELEASE] = st["release_dir"] or paths["base"]
        paths.update(self.adapter_dirs)
        out = next_release_dir(loop.store)
        fitness = fitness_record(
            cfg, loop.store, [o.__dict__ for o in cfg.objectives], cand["values"], data_version=loop.data_key,
            generation=cand["generation"], lineage_of=cand["candidate"],
            eval_sets=False,  # the stream's blocks: eval_blocks below
            stream={"folder": cfg.stream.folder, "version": st["version"], "shard": st["shard"],
                    "versions": list(self.window.versions), "parent_release": st["release"], "rule": rule,
                    # retention lost since each guarded version's anchor (nats; negative: gained)
                    "retention_drift": drift,
                    # the adapters fitted on this version (stream.adapters): settings, loss, time
                    "adapters": {name: _adapter_record(d) for name, d in self.adapter_dirs.items()}},
            current_release_same_data={
                "name": st["release"] or "base",
                "objectives": dict(zip(loop.objective_names, st["reference"]["values"] or [])),
            },
            comparison_sets=list(self.blocks),
            comparison={
                f"current release ({st['release'] or 'base'})": {"valid": loop.cache[st["reference"]["key"]].get("metrics", {})},
                "this release": {"valid": cand["metrics"]},
            },
        )
        t0 = time.time()
        out = write_release(loop.store, cfg, recipe, paths, fitness, out=out, lora="merged", train=self.train,
                            eval_blocks=self.blocks)
        loop.store.event("exported", release=str(out), recipe_key=recipe.key(), values=cand["values"],
                         seconds=round(time.time() - t0, 2), version=st["version"])
        return out


def _adapter_record(model_dir: str) -> dict:
    """The fit's record (``evo_adapter.json``), for the release's fitness.json."""
    return json.loads((Path(model_dir) / MARKER).read_text(encoding="utf-8"))


def _gain(reference: list[float] | None, candidate: dict | None, index: int, goal: str) -> float | None:
    """How much the version's chosen candidate improves the release objective over the current
    release on the same blocks (positive: better, whichever the goal)."""
    if not reference or candidate is None or not candidate.get("values"):
        return None
    diff = float(reference[index]) - float(candidate["values"][index])
    return round(diff if goal == "minimize" else -diff, 6)


def _sample(blocks: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``k`` blocks, a seeded sample in their original order."""
    if len(blocks) <= k:
        return blocks
    return blocks[np.sort(rng.choice(len(blocks), size=k, replace=False))]


def _resample(blocks: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``k`` blocks: a seeded sample, repeating blocks only when there are fewer than ``k``
    (so every rehearsal stratum weighs the same in a batch, however small it is)."""
    if len(blocks) >= k:
        return _sample(blocks, k, rng)
    extra = blocks[rng.choice(len(blocks), size=k - len(blocks), replace=True)]
    return np.concatenate([blocks, extra])
