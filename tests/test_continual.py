"""The continual loop on a real local Ray: shards become data versions, elites are re-evaluated
on each, LoRA genes adapt on the newest data, releases follow the rule, ``--follow`` picks up a
shard dropped in while it runs and stops cleanly on SIGTERM."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest
import torch
import yaml

import evo
from conftest import expect, start_evo, wait_for
from evo.loop.experiment import load_config
from evo.data.corpus import load_domain
from evo.core.errors import EvoError
from evo.artifacts.verify import verify
from evo.artifacts.store import RunStore


@pytest.fixture(scope="module")
def docs():
    return load_domain("doc", max_chars=120_000, doc_chars=600)


@pytest.fixture
def space_file(tmp_path, repo_root):
    space = yaml.safe_load((repo_root / "search_spaces" / "merge_lora.yaml").read_text())
    space["layer_groups"] = 1
    space["genes"]["lora.steps"] = {"type": "int", "low": 3, "high": 6, "scope": "global"}
    space["genes"]["lora.rank"] = {"type": "int", "low": 2, "high": 4, "scope": "global"}
    space["genes"]["lora.lr"] = {"type": "logfloat", "low": 3e-3, "high": 3e-2, "scope": "global"}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def write_shard(path, texts):
    """Write-then-rename, the convention the stream relies on."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    tmp.rename(path)


def stream_config(zoo, space, folder, **over):
    cfg = {
        "zoo": str(zoo.root), "search_space": str(space), "seed": 3,
        "eval": {"seq_len": 32, "max_blocks": 4, "batch_size": 4, "train_blocks": 16},
        "optimizer": {"name": "ga", "population": 4, "options": {"elites": 1}},
        "stream": {"folder": str(folder), "generations": 1, "replay_blocks": 6, "heldout_frac": 0.2, "poll_s": 0.3,
                   "replay_train_blocks": 24},
        # the weighted first release (release.first): these tests follow per-candidate LoRA genes from
        # a balanced first release; the guarded default is exercised with stream.adapters below
        "release": {"tolerance": 10.0, "first": "weighted"},
        "ray": {"evaluators": 2, "cpus_per_evaluator": 0.5, "candidate_timeout_s": 120},
    }
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_new_shard_reevaluates_elites_adapts_and_releases(micro_zoo, ray_session, space_file, tmp_path, docs, dtype):
    """... and each release verifies: in bf16 too, where the evaluators hold the base and task
    vectors rounded, so the export must merge the same rounded sources."""
    folder = tmp_path / "stream"
    folder.mkdir()
    write_shard(folder / "000.jsonl", docs[:40])
    (folder / "001.jsonl").write_text("")                                   # empty
    write_shard(folder / "002.jsonl", docs[:10])                             # all duplicates of 000
    (folder / "003.txt").write_bytes(b"caf\xe9 " * 50)                       # not UTF-8
    (folder / "004.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in docs[40:80]) + json.dumps({"body": "no text field"}) + "\n")
    (folder / "005.jsonl.part").write_text(json.dumps({"text": docs[90]}))  # half-written: not consumed

    result = evo.run(stream_config(micro_zoo, space_file, folder, dtype=dtype), tmp_path / "run", quiet=True)
    store = RunStore.open(tmp_path / "run")
    events = store.events()

    # bad shards are skipped with a reason, counted, and never stop the loop
    shards = {e["shard"]: e for e in events if e["event"] == "shard"}
    assert set(shards) == {"000.jsonl", "001.jsonl", "002.jsonl", "003.txt", "004.jsonl"}
    assert shards["001.jsonl"]["skipped"].startswith("empty")
    assert shards["002.jsonl"]["skipped"].startswith("no new text") and shards["002.jsonl"]["duplicates"] == 10
    assert shards["003.txt"]["skipped"].startswith("not UTF-8")
    assert shards["004.jsonl"]["rejected"] == {"no_text": 1} and shards["004.jsonl"]["kept"] == 40
    assert [v["shard"] for v in result.versions] == ["000.jsonl", "004.jsonl"]

    # the second version re-evaluated what the optimizer remembered, on the new data
    ckpt = store.load_checkpoint()
    second = f"{result.versions[1]['version']}@{result.versions[0]['release']}"
    assert ckpt.data_version == second
    reeval = [c for c in store.candidates() if c.get("reevaluated") and not c.get("reference")]
    assert reeval and all(c["data_version"] == second for c in reeval)
    assert all(c["previous_values"] and c["values"] != c["previous_values"] for c in reeval)
    assert any(e["event"] == "reevaluated" and e["version"] == result.versions[1]["version"] for e in events)
    # no stale fitness: every value the optimizer holds was measured on the newest data
    newest = {tuple(c["genome"]): c["values"] for c in store.candidates()
              if c["data_version"] == second and c.get("genome")}
    for e in ckpt.optimizer["population"]:
        assert newest[tuple(e["genome"])] == e["values"]

    # LoRA genes trained on the newest data: every fresh candidate reports its fit
    fresh = [c for c in store.candidates() if c["data_version"] == second and not c["cached"] and c.get("lora")]
    assert fresh and all(c["lora"]["steps"] >= 3 for c in fresh)
    # LoRA rehearses older text: an equal number of blocks from the zoo's train split and, for the
    # second version, the first version's training split; each candidate's rehearsal gene sets the
    # share of its batches drawn from them
    installed = [e for e in events if e["event"] == "version_installed"]
    assert [e["rehearsal_blocks"] for e in installed] == [24, 48]
    assert all(c["lora"]["rehearsal_share"] == pytest.approx(c["recipe"]["lora"]["rehearsal"]) for c in fresh)
    trained = [c for c in store.candidates() if not c["cached"] and c.get("lora")]
    assert all(c["lora"]["rehearsal_share"] == pytest.approx(c["recipe"]["lora"]["rehearsal"]) for c in trained)
    assert len({round(c["lora"]["rehearsal_share"], 6) for c in trained}) > 1
    # retention is measured per older stratum: the zoo's sets (prior) and the first version
    first_version = result.versions[0]["version"]
    assert {"logppl/newest", "logppl/replay:prior", f"logppl/replay:{first_version}"} == set(fresh[0]["metrics"])
    m = fresh[0]["metrics"]
    assert fresh[0]["values"][1] == pytest.approx((m["logppl/replay:prior"] + m[f"logppl/replay:{first_version}"]) / 2)

    # releases: the first one from the base, later ones name their parent and build on it
    first = tmp_path / "run" / "releases" / "v0001"
    fit = json.loads((first / "fitness.json").read_text())
    assert fit["stream"]["parent_release"] is None and fit["stream"]["shard"] == "000.jsonl"
    assert verify(first)["adaptation"] == pytest.approx(fit["objectives"]["adaptation"]["value"], abs=1e-3)
    assert result.releases == ["v0001", "v0002"]  # seeded: LoRA on the newest shard beats the release
    # the second version's first generation holds "v0001 + the LoRA genes that made v0001"
    made_v1 = next(c for c in store.candidates() if c["candidate"] == result.versions[0]["candidate"])
    warm = [c for c in store.candidates() if c["data_version"] == second and not c.get("reevaluated")
            and c["recipe"].get("lora") == made_v1["recipe"]["lora"]]
    assert any(all(m["parameters"]["weight"] == (1.0 if m["model"] == "release" else 0.0)
                   for m in c["recipe"]["merge"]["models"]) for c in warm)
    second_release = tmp_path / "run" / "releases" / "v0002"
    fit2 = json.loads((second_release / "fitness.json").read_text())
    assert fit2["stream"]["parent_release"] == "v0001"
    assert fit2["stream"]["versions"] == [v["version"] for v in result.versions]
    mk2 = (second_release / "mergekit.yaml").read_text()
    assert "model: v0001" in mk2 and str(tmp_path) not in mk2  # the parent release, by a portable name
    assert "Parent release: v0001" in (second_release / "README.md").read_text()
    # the anchored guard's account: what v0002 lost (or gained) on each older stratum, in the card too
    assert set(fit2["stream"]["retention_drift"]) == {"logppl/replay:prior", f"logppl/replay:{result.versions[0]['version']}"}
    assert "Retention lost since each older version's anchor" in (second_release / "README.md").read_text()
    assert fit2["objectives"]["adaptation"]["value"] < fit2["current_release_same_data"]["objectives"]["adaptation"]
    verify(second_release)

    # status and report read a stream run
    from evo.artifacts.status import status_table

    table = status_table(tmp_path / "run")
    assert "stream: 2 version(s) done" in table and "released v0002" in table
    page = (evo.report(tmp_path / "run")).read_text()
    assert "Data versions and releases" in page and "released v0002" in page

    # a second call with nothing new does nothing (and leaves the half-written shard alone)
    again = evo.resume(tmp_path / "run", quiet=True)
    assert len(again.versions) == 2 and len(store.candidates()) == len(RunStore.open(tmp_path / "run").candidates())
    consumed = [s["name"] for s in json.loads((tmp_path / "run" / "stream.json").read_text())["shards"]]
    assert consumed == ["000.jsonl", "001.jsonl", "002.jsonl", "003.txt", "004.jsonl"]


def _history(run_dir):
    path = run_dir / "checkpoint.json"
    if not path.exists():
        return []
    try:
        ckpt = json.loads(path.read_text())
    except ValueError:
        return []
    return (ckpt.get("stream") or {}).get("history", [])


def test_follow_picks_up_a_dropped_shard_and_stops_cleanly(micro_zoo, ray_session, space_file, tmp_path, docs):
    folder = tmp_path / "stream"
    folder.mkdir()
    write_shard(folder / "000.jsonl", docs[:40])
    cfg = stream_config(micro_zoo, space_file, folder)
    cfg["ray"]["address"] = ray_session.get_runtime_context().gcs_address  # join this session's Ray
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    child = start_evo("run", tmp_path / "exp.yaml", "--run-dir", run_dir, "--follow", "--quiet",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # the first version's release is checkpointed only with the version done: the driver is
        # past it, following the folder for the next shard
        expect(lambda: len(_history(run_dir)) == 1, child, "the first data version", timeout=300)
        assert (run_dir / "releases" / "v0001").is_dir()
        write_shard(folder / "001.jsonl", docs[40:80])  # dropped in while it runs
        expect(lambda: len(_history(run_dir)) == 2, child, "the second data version", timeout=300)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 3, err.decode()[-2000:]  # stopped by SIGTERM: checkpointed, `evo resume --follow` goes on
    history = _history(run_dir)
    assert [h["shard"] for h in history] == ["000.jsonl", "001.jsonl"]
    assert history[1]["released"] == (run_dir / "releases" / "v0002").is_dir()
    events = [e["event"] for e in RunStore.open(run_dir).events()]
    assert events[-1] == "run_paused"
    assert "data versions processed: 2" in out.decode()


def test_stream_config_errors_are_one_line(micro_zoo, space_file, tmp_path):
    folder = tmp_path / "stream"
    folder.mkdir()
    base = stream_config(micro_zoo, space_file, folder)
    cfg = load_config(base)
    assert [o.name for o in cfg.objectives] == ["adaptation", "retention"]
    assert cfg.release_objectives() == ("adaptation", "retention")
    with pytest.raises(EvoError, match=r"stream.folder: folder not found"):
        load_config({**base, "stream": {"folder": str(tmp_path / "missing")}})
    with pytest.raises(EvoError, match=r"release.lora: a stream run merges"):
        load_config({**base, "release": {"lora": "adapter"}})
    with pytest.raises(EvoError, match=r"release.retention: unknown objective 'forgetting'"):
        load_config({**base, "release": {"retention": "forgetting"}})
    fixed = {k: v for k, v in base.items() if k not in ("stream", "release")}
    with pytest.raises(EvoError, match=r"objectives\[0\].sets: unknown evaluation set 'newest'"):
        load_config({**fixed, "objectives": [{"name": "a", "sets": ["newest"]}]})
    with pytest.raises(EvoError, match=r"--follow needs a data stream"):
        evo.run(fixed, tmp_path / "run", follow=True)
    assert not (tmp_path / "run").exists()


def test_restarted_evaluator_gets_the_newest_data_again(micro_zoo, ray_session, space_file, tmp_path):
    """An actor Ray restarts from its constructor holds the run's first data; it answers
    ``stale`` and the pool brings it up to date before the candidate is retried."""
    import numpy as np
    import ray

    from evo.cluster.pool import EvaluatorPool
    from evo.loop.selection import baseline_recipes
    from evo.scoring.sources import Sources

    cfg = load_config({
        "zoo": str(micro_zoo.root), "search_space": str(space_file), "eval": {"seq_len": 32, "max_blocks": 4},
        "ray": {"evaluators": 1, "cpus_per_evaluator": 0.5, "candidate_timeout_s": 120}})
    sources = Sources.load(cfg)
    recipe = baseline_recipes(cfg)["base"]
    rng = np.random.default_rng(0)
    new_sets = {"valid": {"x": rng.integers(0, 200, size=(3, 32), dtype=np.int64)}}
    with EvaluatorPool(cfg, sources, run_name="stale") as pool:
        first = {}
        pool.evaluate({"k": ("a", recipe)}, first.__setitem__)
        pool.update(eval_sets=new_sets)
        updated = {}
        pool.evaluate({"k": ("b", recipe)}, updated.__setitem__)
        assert set(updated["k"]["metrics"]) == {"logppl/x"} != set(first["k"]["metrics"])
        pid = ray.get(pool.actors[0].pid.remote())
        ray.kill(pool.actors[0], no_restart=False)  # Ray re-creates it from the constructor's data

        def restarted() -> bool:  # the event: the restarted process answers
            try:
                return ray.get(pool.actors[0].pid.remote(), timeout=30) != pid
            except ray.exceptions.RayError:
                return False

        wait_for(restarted, timeout=120, poll_s=0.5)
        again = {}
        pool.evaluate({"k": ("c", recipe)}, again.__setitem__)
        assert again["k"]["status"] == "ok" and again["k"]["worker"]["pid"] != pid
        assert again["k"]["metrics"] == pytest.approx(updated["k"]["metrics"])


def adapters_config(zoo, repo_root, folder, **over):
    """A merge-only space over the specialists, the release and one adapter fitted per version."""
    cfg = stream_config(zoo, repo_root / "search_spaces" / "stream_adapters.yaml", folder, **over)
    cfg["release"] = {"tolerance": 10.0}  # first: guarded, the default
    cfg["stream"] = {**cfg["stream"], "prior": "per_set",
                     "adapters": {"lora": {"rank": 4, "alpha": 8, "target_modules": "all", "lr": 2e-2, "steps": 20,
                                           "batch_size": 4, "rehearsal": 0.5}}}
    return cfg


def test_adapters_are_fitted_once_per_version_and_merged(micro_zoo, ray_session, repo_root, tmp_path, docs):
    """``stream.adapters``: one LoRA fit per version (from the current release, rehearsing older
    text), which candidates merge as a source model; no candidate fits anything; releases name
    the adapted model in their recipe and verify; a resume reuses the fits; the status shows
    each version's gain, drift and where its time went."""
    from evo.artifacts.status import status_table
    from evo.loop.adapt import MARKER

    folder = tmp_path / "stream"
    folder.mkdir()
    write_shard(folder / "000.jsonl", docs[:40])
    write_shard(folder / "001.jsonl", docs[40:80])
    cfg = adapters_config(micro_zoo, repo_root, folder)
    result = evo.run(cfg, tmp_path / "run", quiet=True)
    store = RunStore.open(tmp_path / "run")
    events = store.events()
    versions = [h["version"] for h in result.versions]
    assert len(versions) == 2

    adapted = [e for e in events if e["event"] == "adapted"]
    assert [(e["version"], e["adapter"]) for e in adapted] == [(v, "lora") for v in versions]
    assert adapted[0]["release"] is None and adapted[1]["release"] == result.versions[0]["release"] == "v0001"
    assert all(e["steps"] == 20 and e["rehearsal_share"] == 0.5 for e in adapted)
    assert all(e["loss_end"] < e["loss_start"] for e in adapted)  # the fit learned the shard
    for v, parent in zip(versions, ("base", "v0001")):
        fitted = tmp_path / "run" / "adapters" / f"{v}@{parent}" / "lora"
        assert (fitted / MARKER).is_file() and (fitted / "model.safetensors").is_file()
    # the adapter directory holds base + the step: exactly the base outside the LoRA targets, and
    # release + step == the fit (the step from v0001 on the second version)
    from evo.merge import load_model_dir

    base, _ = load_model_dir(micro_zoo.base_dir)
    step, _ = load_model_dir(tmp_path / "run" / "adapters" / f"{versions[1]}@v0001" / "lora")
    assert all(torch.equal(step[k], base[k]) for k in base if "proj" not in k)
    assert any(not torch.equal(step[k], base[k]) for k in base if "proj" in k)

    # candidates merge; none fits a LoRA, and "release + the adapter's step" is one of them
    cands = store.candidates()
    assert cands and not any(c.get("lora") for c in cands if c["status"] == "ok")
    def weights(c):
        return {m["model"]: set(m["parameters"]["weight"]) for m in c["recipe"]["merge"]["models"]}

    alone = [c for c in cands if not c.get("reference") and c["status"] == "ok"
             and weights(c) == {"lora": {1.0}, "release": {1.0}, **{d: {0.0} for d in micro_zoo.domains}}]
    assert {c["data_version"] for c in alone} == {f"{versions[0]}@base", f"{versions[1]}@v0001"}
    # the static sets are guarded one by one (stream.prior: per_set)
    prior = {f"logppl/replay:prior:{d}" for d in micro_zoo.domains}
    assert prior <= set(alone[-1]["metrics"])

    # each release records the adapted model it merged, and re-measures exactly
    fit = json.loads((tmp_path / "run" / "releases" / "v0001" / "fitness.json").read_text())
    assert verify(tmp_path / "run" / "releases" / "v0001")["adaptation"] == pytest.approx(
        fit["objectives"]["adaptation"]["value"], abs=1e-3)
    assert "model: lora" in (tmp_path / "run" / "releases" / "v0001" / "mergekit.yaml").read_text()
    assert fit["stream"]["adapters"]["lora"]["genes"]["rank"] == 4 and fit["stream"]["adapters"]["lora"]["steps"] == 20
    second = json.loads((tmp_path / "run" / "adapters" / f"{versions[1]}@v0001" / "lora" / MARKER).read_text())
    assert second["start"].endswith("v0001")  # the step was fitted from the release current then

    # where each version's time went, and its gain over the release before it
    for h in result.versions:
        assert {"install", "reevaluate", "evolve"} <= set(h["seconds"])
        assert h["gain"] is not None
    table = status_table(tmp_path / "run")
    assert "gain " in table and "install " in table

    # resuming with nothing new fits nothing again
    evo.resume(tmp_path / "run", quiet=True)
    assert len([e for e in RunStore.open(tmp_path / "run").events() if e["event"] == "adapted"]) == 2


def test_adapter_config_errors_are_one_line(micro_zoo, repo_root, space_file, tmp_path):
    folder = tmp_path / "stream"
    folder.mkdir()
    cfg = adapters_config(micro_zoo, repo_root, folder)
    bad_lr = json.loads(json.dumps(cfg))
    bad_lr["stream"]["adapters"]["lora"]["lr"] = 3
    with pytest.raises(EvoError, match=r"stream.adapters.lora.lr: must be in \(0, 1\), got 3"):
        evo.run(bad_lr, tmp_path / "run")
    clash = json.loads(json.dumps(cfg))
    clash["stream"]["adapters"] = {"code": {"rank": 4}}
    with pytest.raises(EvoError, match=r"stream.adapters.code: the name 'code' is taken"):
        evo.run(clash, tmp_path / "run")
    lora_space = {**cfg, "search_space": str(space_file)}
    with pytest.raises(EvoError, match=r"stream.adapters: the search space .* has lora.\* genes"):
        evo.run(lora_space, tmp_path / "run")
    with pytest.raises(EvoError, match=r"stream.prior: must be 'joint' or 'per_set'"):
        load_config({**cfg, "stream": {**cfg["stream"], "prior": "each"}})
    assert not (tmp_path / "run").exists()
