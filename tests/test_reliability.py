"""Reliability round 3, as a user meets it from the command line: one driver per run directory
(a stale lock does not block), what a resume may change, an evaluator Ray restarts is waited for,
releases that are self-contained (no symlinks, umask modes, no builder paths), a `ray.address`
that is not Ray, a dashboard bound beyond loopback, a double Ctrl-C, `--version`.

Every wait here is on an event (a line in a file, a process state), never on a clock: the
``timeout`` of a subprocess call only ends a test that hangs, so it fails instead of stalling CI.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
import yaml

import evo
from evo.artifacts.lock import LOCK_NAME
from evo.artifacts.verify import verify
from conftest import HANG, read_until, run_evo, start_evo, wait_for
from evo.artifacts.store import RunStore
from evo.cli import EXIT_ABORTED, EXIT_ERROR, EXIT_OK, main as cli
from evo.core.errors import EvoError


def _config(zoo, space, **over) -> dict:
    cfg = {"zoo": str(zoo.root), "search_space": str(space), "seed": 2,
           "eval": {"seq_len": 32, "max_blocks": 4, "batch_size": 4},
           "optimizer": {"name": "cmaes", "generations": 2, "population": 4},
           "ray": {"evaluators": 1, "cpus_per_evaluator": 0.5, "dashboard": False}}
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def _write(tmp_path, cfg, name="exp.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _evo_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("evo: ")]


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


# ---------------------------------------------------------------------------------------- 1, 2
def test_one_driver_per_run_dir_a_stale_lock_does_not_block_and_resume_changes_only_what_it_may(
        micro_zoo, ray_session, space_file, tmp_path):
    """A live run refuses a second `evo resume` and an `evo export`, naming its PID and host;
    SIGKILLed, its lock is stale and a resume goes on; an edited population is refused naming
    the field, an edited generation count is applied; no candidate is recorded twice."""
    cfg = _config(micro_zoo, space_file, optimizer={"name": "cmaes", "generations": 400, "population": 4},
                  ray={"address": ray_session.get_runtime_context().gcs_address})
    path, run_dir = _write(tmp_path, cfg), tmp_path / "run"
    child = start_evo("run", path, "--run-dir", run_dir, "--quiet", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # generation 0 checkpointed and at least one candidate of generation 1 recorded
        assert wait_for(lambda: (run_dir / "checkpoint.json").exists() and _lines(run_dir / "candidates.jsonl") >= 14,
                      child), "the run ended before a second driver could meet it"
        second = run_evo("resume", run_dir)
        export = run_evo("export", run_dir)
        status = run_evo("status", run_dir)
        assert child.poll() is None, "the run ended while the second driver was refused"
    finally:
        child.kill()  # SIGKILL: the lock is left behind, held by a dead process
        child.wait()
    for done in (second, export):
        assert done.returncode == EXIT_ERROR, done.stderr[-2000:]
        lines = _evo_lines(done.stderr)
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert f"in use by evo driver PID {child.pid} on host {socket.gethostname()}" in lines[0], lines[0]
    assert f"running: evo driver PID {child.pid}" in status.stdout
    assert [e["event"] for e in RunStore(run_dir).events()].count("run_resumed") == 0  # refused before writing

    # only fields a resume may change are applied
    config = run_dir / "config.yaml"
    original = config.read_text()
    edited = yaml.safe_load(original)
    edited["optimizer"]["population"] = 6
    config.write_text(yaml.safe_dump(edited, sort_keys=False))
    refused = run_evo("resume", run_dir, "--quiet")
    assert refused.returncode == EXIT_ERROR
    assert _evo_lines(refused.stderr) == [_evo_lines(refused.stderr)[0]]
    assert "optimizer.population changed from 4 to 6" in refused.stderr and str(config) in refused.stderr

    edited["optimizer"]["population"] = 4
    generation = RunStore(run_dir).load_checkpoint().generation
    edited["optimizer"]["generations"] = generation + 1
    sources = edited["models"]["sources"]
    edited["models"]["sources"] = dict(reversed(sources.items()))  # the genes would map to other models
    config.write_text(yaml.safe_dump(edited, sort_keys=False))
    reordered = run_evo("resume", run_dir, "--quiet")
    assert reordered.returncode == EXIT_ERROR and "models.sources (order) changed" in reordered.stderr, reordered.stderr
    edited["models"]["sources"] = sources
    config.write_text(yaml.safe_dump(edited, sort_keys=False))
    resumed = run_evo("resume", run_dir)  # the dead driver's lock does not block it
    assert resumed.returncode == EXIT_OK, resumed.stderr[-2000:]
    assert f"optimizer.generations: 400 -> {generation + 1}" in resumed.stdout
    store = RunStore(run_dir)
    assert store.load_checkpoint().generation == generation + 1 and store.load_checkpoint().selection
    raw = [json.loads(ln) for ln in (run_dir / "candidates.jsonl").read_text().splitlines() if ln.strip()]
    ids = [(r["candidate"], r["generation"], r["key"]) for r in raw]
    assert len(ids) == len(set(ids)), "a candidate was recorded twice across the kill"
    assert not (run_dir / LOCK_NAME).read_text()  # released: it names nobody


def test_a_record_told_twice_is_written_once(tmp_path):
    store = RunStore.create(tmp_path / "run", {"name": "x"})
    rec = {"candidate": "g0001-c002", "generation": 1, "key": "k|d", "values": [1.0]}
    store.record_candidate(rec)
    RunStore(tmp_path / "run").record_candidate(dict(rec))  # a resumed driver: a fresh store object
    RunStore(tmp_path / "run").record_candidate({**rec, "generation": 2, "key": "k|d|b2"})  # an elite re-scored
    assert _lines(tmp_path / "run" / "candidates.jsonl") == 2 and len(store.candidates()) == 2


# ---------------------------------------------------------------------------------------- 3
def _session_evaluators(name_part: str):
    """Worker processes of this test session's Ray whose title is an evaluator's."""
    me = os.getpid()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if re.match(r"ray::(Evaluator|g\d{4}-c\d{3})", cmd):
            try:
                if me in {q.pid for q in p.parents()}:
                    yield p
            except psutil.Error:
                continue


def test_the_only_evaluator_killed_is_waited_for_and_the_run_ends_as_undisturbed(micro_zoo, ray_session, space_file,
                                                                                  tmp_path):
    """kill -9 of the run's one evaluator: Ray restarts it (RESTARTING, restarts left), the pool
    waits for it, re-sends the sources and the candidate, and the run releases the same best as
    an undisturbed run of the same seed (--sync: bit-for-bit)."""
    cfg = _config(micro_zoo, space_file, optimizer={"name": "cmaes", "generations": 3, "population": 4},
                  ray={"address": ray_session.get_runtime_context().gcs_address, "retries": 2})
    path = _write(tmp_path, cfg)
    reference = run_evo("run", path, "--run-dir", tmp_path / "reference", "--sync", "--quiet")
    assert reference.returncode == EXIT_OK, reference.stderr[-2000:]

    run_dir = tmp_path / "killed"
    child = start_evo("run", path, "--run-dir", run_dir, "--sync", "--quiet", stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    killed = []
    try:
        def kill_one() -> bool:  # once generation 0 is in: the evaluator, busy or idle
            if _lines(run_dir / "candidates.jsonl") < 4:
                return False
            for proc in _session_evaluators("evaluator"):
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    continue
                killed.append(proc.pid)
                return True
            return False

        assert wait_for(kill_one, child), "no evaluator was seen while the run was live"
        out, err = child.communicate(timeout=HANG)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == EXIT_OK, err[-3000:]
    assert "every evaluator was lost" not in err
    best = lambda run: RunStore(tmp_path / run).load_checkpoint().best  # noqa: E731
    assert best("killed")["recipe"] == best("reference")["recipe"] and best("killed")["values"] == best("reference")["values"]
    assert out.splitlines()[-1] == reference.stdout.splitlines()[-1].replace("reference", "killed")


# ---------------------------------------------------------------------------------------- 4, 5, 11
@pytest.fixture(scope="module")
def private_zoo_release(micro_zoo, ray_session, tmp_path_factory, repo_root):
    """A release exported under umask 027 from a zoo whose tokenizer files are 0600, of a run
    scored on a task file that is deleted before verify (the release holds its own copy)."""
    root = tmp_path_factory.mktemp("selfcontained")
    zoo = root / "zoo"
    shutil.copytree(micro_zoo.root, zoo)
    for f in list(zoo.rglob("tokenizer*")) + list(zoo.rglob("generation_config.json")):
        if f.is_file():
            f.chmod(0o600)
    task_dir = root / "task"
    shutil.copytree(repo_root / "tasks" / "arithmetic", task_dir)
    space = root / "space.yaml"
    spec = yaml.safe_load((repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml").read_text())
    spec["layer_groups"] = 2
    space.write_text(yaml.safe_dump(spec))
    cfg = {"zoo": str(zoo), "search_space": str(space), "seed": 1,
           "eval": {"seq_len": 32, "max_blocks": 4, "batch_size": 4, "task_limit": 8,
                    "tasks": {"arith": str(task_dir / "arithmetic_mc.yaml")}},
           "optimizer": {"name": "cmaes", "generations": 1, "population": 4},
           "ray": {"evaluators": 1, "cpus_per_evaluator": 0.5}}
    previous = os.umask(0o027)
    try:
        result = evo.run(cfg, root / "run", quiet=True)
        release = evo.export(root / "run")
    finally:
        os.umask(previous)
    shutil.rmtree(task_dir)
    # where the run's time went, as the run prints it at the end (issue 26)
    split = result.time
    assert {"start points", "search", "selection", "start-up and other"} <= set(split["steps_s"]), split
    assert abs(sum(split["steps_s"].values()) - split["wall_s"]) < 0.1 and 0 < split["busy"] <= 1, split
    assert split["tokens_per_s"] > 0 and set(split["per_evaluator"]) == {"0"}, split
    return root, release


def test_a_release_follows_the_umask_and_names_no_builder_path(private_zoo_release, capsys):
    root, release = private_zoo_release
    assert cli(["status", str(root / "run")]) == EXIT_OK
    assert "last driver call: time " in capsys.readouterr().out
    modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [release, *release.rglob("*"), *(root / "run").iterdir()]}
    wrong = {k: oct(m) for k, m in modes.items() if m != (0o750 if (root / k).is_dir() else 0o640)}
    assert not wrong, wrong  # tokenizer files, eval/blocks.safetensors, run files: all 0640, folders 0750
    for f in release.rglob("*"):
        if f.suffix in (".json", ".yaml", ".md", ".sha256", ".jsonl"):
            assert str(root) not in f.read_text(encoding="utf-8"), f"{f} names the builder's path"
    fitness = json.loads((release / "fitness.json").read_text())
    assert fitness["run"] == "run" and fitness["eval"]["tasks"] == {"arith": "eval/tasks/arith.yaml"}
    assert set(fitness["eval"]["sets_sha256"]) == set(fitness["eval"]["sets"])
    assert verify(release)  # the task file it was scored on is gone from the builder's folder


@pytest.mark.parametrize("target", ["tokenizer.json", "eval"])
def test_verify_refuses_a_symlink_inside_the_release(private_zoo_release, tmp_path, target):
    _, release = private_zoo_release
    copy = tmp_path / "release"
    shutil.copytree(release, copy)
    outside = tmp_path / f"outside-{target}"
    shutil.move(copy / target, outside)
    (copy / target).symlink_to(outside)
    code = cli(["verify", str(copy)])
    assert code == EXIT_ERROR
    with pytest.raises(EvoError, match=rf"{re.escape(str(copy / target))}: a symlink \(to {re.escape(str(outside))}\)"):
        verify(copy)
    (copy / target).unlink()
    os.mkfifo(copy / target)  # nor anything else that is not a regular file or folder
    with pytest.raises(EvoError, match=rf"{re.escape(str(copy / target))}: not a regular file or folder"):
        verify(copy)


# ---------------------------------------------------------------------------------------- 7
def test_an_address_that_is_not_ray_fails_in_one_line_and_leaves_nothing(micro_zoo, space_file, tmp_path):
    """A web server where the GCS should be: once, ray.init retried it for > 10 minutes, deaf
    to SIGINT/SIGTERM, and left a run directory behind."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        cfg = _config(micro_zoo, space_file, ray={"address": address, "connect_timeout_s": 5})
        done = run_evo("run", _write(tmp_path, cfg), "--run-dir", tmp_path / "run")
    finally:
        server.shutdown()
    assert done.returncode == EXIT_ERROR, done.stderr[-2000:]
    assert done.stderr.splitlines() == _evo_lines(done.stderr)[:1], done.stderr[-2000:]  # one line, nothing of Ray's
    assert f"ray.address: {address} is not a Ray cluster's GCS" in done.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- 8
def test_seq_len_beyond_the_models_context_is_refused(micro_zoo, space_file, tmp_path, capsys):
    context = json.loads((micro_zoo.root / "base" / "config.json").read_text())["max_position_embeddings"]
    cfg = _config(micro_zoo, space_file, eval={"seq_len": context + 1})
    assert cli(["run", _write(tmp_path, cfg), "--run-dir", str(tmp_path / "run")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"eval.seq_len {context + 1} exceeds the base model's context (max_position_embeddings {context}" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- 6, 9, 10
def test_exposed_dashboard_is_announced_and_a_double_ctrl_c_exits_130_leaving_no_ray(micro_zoo, space_file, tmp_path):
    """An embedded Ray with ``dashboard_host: 0.0.0.0``: one warning line and the real bind
    address; Ray's token banner kept off stderr; two SIGINTs: exit 130, and none of the Ray
    processes the run started (GCS, raylet, dashboard and its agents) outlives it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config(micro_zoo, space_file, optimizer={"name": "cmaes", "generations": 400, "population": 4},
                  ray={"dashboard": True, "dashboard_host": "0.0.0.0", "dashboard_port": port})
    run_dir = tmp_path / "run"
    child = start_evo("run", _write(tmp_path, cfg), "--run-dir", run_dir, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (run_dir / "checkpoint.json").exists(), child), child.stderr.read()[-2000:]
        ray_procs = [p for p in psutil.Process(child.pid).children(recursive=True)]
        assert any("dashboard" in " ".join(p.cmdline()) for p in ray_procs)
        child.send_signal(signal.SIGINT)
        seen = read_until(child.stdout, lambda line: line.startswith("SIGINT received"))  # the stop is under way
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=HANG)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == EXIT_ABORTED, err[-3000:]
    assert "Token authentication" not in err and "Traceback" not in err, err[-3000:]
    lines = _evo_lines(err)
    assert lines[0].startswith(f"evo: warning: the Ray dashboard listens on 0.0.0.0:{port} (every interface)"), err
    assert lines[-1] == "evo: interrupted", err[-3000:]
    assert f"Ray dashboard: http://0.0.0.0:{port}" in "".join(seen)
    # Ray's processes end with its shutdown; the wait is on their exit, bounded well below the
    # ~100 s that orphaned agents used to live
    _, alive = psutil.wait_procs(ray_procs, timeout=30)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive if p.is_running()]


def test_the_dashboard_url_names_the_bind_address():
    from evo.cluster.network import is_loopback as _is_loopback, url_host as _url_host

    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.1.2.3") and not _is_loopback("example.org")
    assert _url_host("::") == "[::]" and _url_host("0.0.0.0") == "0.0.0.0"


# ---------------------------------------------------------------------------------------- 12
def test_version(capsys):
    from importlib.metadata import version

    assert cli(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"evo {version('evo')}"
    assert cli(["--version", "--verbose"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"torch {version('torch')}" in out and f"ray {version('ray')}" in out and "transformers" in out


def test_a_finished_run_resumed_with_more_generations_searches_on_and_selects_again(
        micro_zoo, ray_session, space_file, tmp_path):
    """The selection stage's advice (raise optimizer.generations, `evo resume`) works: a finished
    run searches on from its checkpoint (the candidates of generation 0 are not scored again) and
    selects again; resumed unchanged, a finished run stays finished."""
    cfg = {
        "name": "more", "zoo": str(micro_zoo.root), "search_space": str(space_file),
        "eval": {"seq_len": 32, "max_blocks": 4, "batch_size": 4},
        "optimizer": {"name": "cmaes", "generations": 1, "population": 4, "async": False},
        "ray": {"evaluators": 2, "cpus_per_evaluator": 0.5, "candidate_timeout_s": 120},
        "seed": 5,
    }
    run_dir = tmp_path / "run"
    first = evo.run(cfg, run_dir, quiet=True)
    assert first.selection and RunStore(run_dir).load_checkpoint().generation == 1
    before = RunStore(run_dir).candidates()

    same = evo.resume(run_dir, quiet=True)  # nothing changed: nothing to do
    assert len(RunStore(run_dir).candidates()) == len(before) and same.selection == first.selection
    assert "run_reopened" not in [e["event"] for e in RunStore(run_dir).events()]

    config = run_dir / "config.yaml"
    edited = yaml.safe_load(config.read_text())
    edited["optimizer"]["generations"] = 2
    config.write_text(yaml.safe_dump(edited, sort_keys=False))
    more = evo.resume(run_dir, quiet=True)
    store = RunStore(run_dir)
    assert store.load_checkpoint().generation == 2
    after = store.candidates()
    assert [c for c in after if c["generation"] == 0] == [c for c in before if c["generation"] == 0]
    assert {c["generation"] for c in after} == {0, 1}
    events = [e["event"] for e in store.events()]
    assert events.count("run_reopened") == 1 and events.count("selection") == 2
    assert events.index("run_reopened") < len(events) - 1 - events[::-1].index("selection")
    assert more.selection and more.selection["release"]
