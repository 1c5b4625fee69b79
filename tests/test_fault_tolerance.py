"""Ray at production grade, with a real local Ray: a killed evaluator loses no candidate, and a
killed driver resumes to the same best as an uninterrupted run."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import psutil
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

import evo
from conftest import start_evo, wait_for
from evo.artifacts.store import RunStore


@pytest.fixture(scope="module")
def slow_sources(micro_zoo, tmp_path_factory):
    """A base and three 'specialists' big enough (~2.5M params) that an evaluation lasts long
    enough to be killed mid-flight; specialists are the base plus seeded noise."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("slow")
    tok = AutoTokenizer.from_pretrained(micro_zoo.base_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = {}
    for i, name in enumerate(["base", "a", "b", "c"]):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return {
        "models": {"base": paths["base"], "sources": {k: paths[k] for k in "abc"}},
        "eval": {"sets": {d: str(micro_zoo.data_dir(d, "valid")) for d in micro_zoo.domains},
                 "seq_len": 64, "max_blocks": 16, "batch_size": 8},
    }


def _space(tmp_path, repo_root):
    data = yaml.safe_load((repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml").read_text())
    data["layer_groups"] = 2
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _busy_evaluators():
    """Worker processes of *this* test session's Ray running a candidate (Ray titles them after
    the task, ``ray::gXXXX-cYYY``); another evo run on the machine is left alone."""
    out, me = [], os.getpid()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if re.match(r"ray::g\d{4}-c\d{3}", cmd):
            try:
                if me in {q.pid for q in p.parents()}:
                    out.append(p)
            except psutil.Error:
                continue
    return out


def test_killed_evaluator_loses_no_candidate(slow_sources, ray_session, tmp_path, repo_root):
    cfg = {**slow_sources, "search_space": _space(tmp_path, repo_root), "seed": 3,
           "optimizer": {"name": "random", "generations": 2, "population": 6},
           "ray": {"evaluators": 2, "cpus_per_evaluator": 0.5, "retries": 2}}
    killed = []

    finished = threading.Event()

    def killer():  # the driver must run in the main thread; the test's hand runs beside it
        # waits on the run (a busy evaluator, or the run's end), never on a clock
        while not killed and not finished.is_set():
            for proc in _busy_evaluators():
                try:
                    cmd = " ".join(proc.cmdline())
                    proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    continue
                killed.append((proc.pid, re.match(r"ray::(g\d{4}-c\d{3})", cmd).group(1)))
                break
            time.sleep(0.01)

    hand = threading.Thread(target=killer, daemon=True)
    hand.start()
    try:
        evo.run(cfg, tmp_path / "run", quiet=True)
    finally:
        finished.set()
        hand.join()
    assert killed, "no evaluator was seen running a candidate"
    store = RunStore.open(tmp_path / "run")
    cands = store.candidates()
    assert len(cands) == 12 and not [c for c in cands if c["status"] == "failed"]
    # the candidate whose worker was killed was re-run, unless the kill landed in the instant
    # between its result leaving the worker and the worker's title changing (a loaded machine
    # widens that instant): then the restarted, empty evaluator was re-sent the sources and the
    # next candidate ran on it; either way nothing was lost and the worker was replaced
    cache = store.cache_load()
    victim = next(c for c in cands if c["candidate"] == killed[0][1])
    workers = [r.get("worker") or {} for r in cache.values()]
    actor = {w.get("name") for w in workers if w.get("pid") == killed[0][0]}  # the killed worker's evaluator
    replaced = any(w.get("name") in actor and w.get("pid") != killed[0][0] for w in workers)
    assert cache[victim["key"]].get("attempts", 1) > 1 or replaced, (killed, victim)


def _generation(run_dir):
    ckpt = RunStore(run_dir).load_checkpoint() if (run_dir / "checkpoint.json").exists() else None
    return ckpt.generation if ckpt else 0


def _cached(run_dir):
    path = run_dir / "cache.jsonl"
    return sum(1 for _ in open(path)) if path.exists() else 0


@pytest.fixture(scope="module", params=["sync", "async"])
def driver_run(request, micro_zoo, ray_session, tmp_path_factory, repo_root):
    """The killed-driver experiment and its uninterrupted reference run (shared by both kill
    points), generation-synchronous or steady state. 64 one-block batches per set make a
    candidate last ~0.3 s, so a generation's second half is a window of a second, not of the few
    milliseconds a micro model takes. The steady-state run uses one evaluator: its arrival order
    is then fixed, so the resumed run must match the reference exactly (with two, the order is
    the machine's; the replay of a recorded order is checked in test_runner)."""
    mode = request.param
    root = tmp_path_factory.mktemp(f"driver-{mode}")
    cfg = {"zoo": str(micro_zoo.root), "search_space": _space(root, repo_root), "seed": 5,
           "eval": {"seq_len": 64, "max_blocks": 64, "batch_size": 1},
           # start: uniform — the kill points count generation 0's cache entries (the start is
           # replayed from the cache in test_runner's replay test)
           "optimizer": {"name": "ga", "generations": 4, "population": 8, "options": {"elites": 2},
                         "async": mode == "async", "start": "uniform"},
           "ray": {"evaluators": 2 if mode == "sync" else 1, "cpus_per_evaluator": 0.5,
                   # the child driver joins this session's Ray instead of starting its own
                   "address": ray_session.get_runtime_context().gcs_address}}
    reference = evo.run({**cfg, "ray": {**cfg["ray"], "address": None}}, root / "reference", quiet=True)
    # sync: generation 1 re-uses the 2 elites and evaluates the rest: those are what a
    # mid-generation kill interrupts, so the test below needs at least 2 of them
    gen1 = RunStore.open(root / "reference").load_checkpoint().logbook[1]
    assert gen1["evals"] >= 2, gen1
    return mode, cfg, reference, gen1["evals"]


def _told_after_checkpoint(run_dir) -> int:
    """Steady-state runs: tells in the search log that the checkpoint does not include yet."""
    store = RunStore(run_dir)
    ckpt = store.load_checkpoint()
    position = (ckpt.steady_state or {}).get("log_position", 0) if ckpt else 0
    return sum(e["step"] == "tell" for e in store.search_log()[position:])


@pytest.mark.parametrize("kill_at", ["mid-generation-1", "after-generation-2"])
def test_killed_driver_resumes_to_the_same_best(driver_run, tmp_path, kill_at):
    mode, cfg, reference, gen1_evals = driver_run
    run_dir = tmp_path / "killed"
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    child = start_evo("run", tmp_path / "exp.yaml", "--run-dir", run_dir, "--quiet", stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE)
    # the kill points fall in windows of about a second: poll every 10 ms
    try:
        if kill_at == "mid-generation-1" and mode == "sync":  # generation 0's 8 results are in, and 1 of generation 1's
            reached = wait_for(lambda: _cached(run_dir) > 8 and _generation(run_dir) == 1, child, timeout=240, poll_s=0.01)
        elif kill_at == "mid-generation-1":  # 2 of generation 1's results told, not yet checkpointed
            reached = wait_for(lambda: _generation(run_dir) == 1 and _told_after_checkpoint(run_dir) >= 2, child,
                               timeout=240, poll_s=0.01)
        else:
            reached = wait_for(lambda: _generation(run_dir) >= 2, child, timeout=240, poll_s=0.01)
        assert reached, child.stderr.read().decode()[-2000:] if child.poll() is not None else "timeout"
    finally:
        child.kill()
        child.wait()
    cached_before = _cached(run_dir)
    if kill_at == "mid-generation-1" and mode == "sync":  # killed with part of generation 1 evaluated
        assert _generation(run_dir) == 1 and 8 < cached_before < 8 + gen1_evals
    elif kill_at == "mid-generation-1":  # the resume replays what the log holds past the checkpoint
        assert _generation(run_dir) == 1 and 2 <= _told_after_checkpoint(run_dir) < 8
    else:
        assert _generation(run_dir) < 4
    resumed = evo.resume(run_dir, quiet=True)
    assert resumed.best_recipe.key() == reference.best_recipe.key()
    assert resumed.best_values == pytest.approx(reference.best_values, abs=1e-9)
    # every fitness computed before the kill was reused, not recomputed
    import json

    keys = []
    for line in open(run_dir / "cache.jsonl"):
        try:
            keys.append(json.loads(line)["key"])
        except json.JSONDecodeError:  # the line the killed driver was writing
            pass
    assert len(keys) == len(set(keys)), "a recipe was evaluated twice"
    assert len(keys) >= cached_before - 1
    if mode == "async":  # the same candidates in the same order of arrival as the undisturbed run
        ref_log = RunStore(reference.run_dir).search_log()
        assert RunStore(run_dir).search_log() == ref_log
    events = [e["event"] for e in RunStore.open(run_dir).events()]
    assert "run_resumed" in events and events[-1] == "run_finished"
