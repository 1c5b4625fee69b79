"""What the command line tells a user when a run does not simply finish: exit codes that tell
stopped, failed and empty apart, one-line errors, no run directory left by a failed start, no
traceback for a closed pipe or a full disk."""
from __future__ import annotations

import errno
import subprocess

import pytest
import yaml

import evo
from conftest import read_until, run_evo, start_evo, wait_for
from evo.cli import EXIT_ALL_FAILED, EXIT_ERROR, EXIT_NO_DATA, EXIT_STOPPED
from evo.cli import main as cli
from evo.artifacts.store import RunStore


def config(zoo, space, **over) -> dict:
    cfg = {"zoo": str(zoo.root), "search_space": str(space), "seed": 2,
           "eval": {"seq_len": 32, "max_blocks": 4, "batch_size": 4},
           "optimizer": {"name": "ga", "generations": 1, "population": 4, "options": {"elites": 1}},
           "ray": {"evaluators": 2, "cpus_per_evaluator": 0.5}}
    cfg.update(over)
    return cfg


def write(tmp_path, cfg, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("evo: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_every_candidate_failing_exits_4_with_the_first_reason(micro_zoo, ray_session, tmp_path, capsys):
    """slerp over three specialists: every candidate is an invalid recipe (slerp merges two
    models); the control, the uniform average, is not drawn from the space and is fine."""
    space = {"name": "slerp3", "merge_method": "slerp", "layer_groups": 1,
             "genes": {"t": {"type": "float", "low": 0.0, "high": 1.0, "scope": "global"}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    cfg = config(micro_zoo, tmp_path / "space.yaml", optimizer={"name": "random", "generations": 1, "population": 3})
    code = cli(["run", write(tmp_path, cfg), "--run-dir", str(tmp_path / "run"), "--quiet"])
    line = one_line_error(capsys)
    assert code == EXIT_ALL_FAILED, line
    assert "every candidate failed; first failure: g0000-c000: invalid recipe:" in line and "slerp" in line


def test_a_stream_without_data_exits_5(micro_zoo, ray_session, space_file, tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    cfg = config(micro_zoo, space_file, stream={"folder": str(tmp_path / "shards"), "generations": 1})
    assert cli(["run", write(tmp_path, cfg), "--run-dir", str(tmp_path / "run"), "--quiet"]) == EXIT_NO_DATA
    assert "no data version in" in one_line_error(capsys)


def test_a_failed_start_leaves_no_run_directory(micro_zoo, space_file, tmp_path, capsys):
    # an unknown optimizer option: refused before the run directory exists, naming the config
    cfg = write(tmp_path, config(micro_zoo, space_file, optimizer={"name": "ga", "options": {"sigmaa": 1}}))
    assert cli(["run", cfg, "--run-dir", str(tmp_path / "run")]) == EXIT_ERROR
    assert cfg in one_line_error(capsys) and not (tmp_path / "run").exists()
    # an error only the start can find (an evaluation set with no text): what it created is removed,
    # so the same command works once the input is fixed
    (tmp_path / "empty.jsonl").write_text("")
    bad = config(micro_zoo, space_file)
    bad["eval"] = {**bad["eval"], "sets": {"empty": str(tmp_path / "empty.jsonl")}}
    assert cli(["run", write(tmp_path, bad), "--run-dir", str(tmp_path / "run")]) == EXIT_ERROR
    assert "empty.jsonl" in one_line_error(capsys) and not (tmp_path / "run").exists()
    # a --run-dir that is a file
    (tmp_path / "afile").write_text("x")
    assert cli(["run", cfg, "--run-dir", str(tmp_path / "afile")]) == EXIT_ERROR
    assert "names an existing file" in one_line_error(capsys)


def test_unknown_dtype_and_optimizer_fail_at_load_naming_the_file(micro_zoo, space_file, tmp_path, capsys):
    for over, field in (({"dtype": "float64"}, "dtype"), ({"optimizer": {"name": "pso"}}, "optimizer.name")):
        path = write(tmp_path, config(micro_zoo, space_file, **over))
        assert cli(["run", path, "--run-dir", str(tmp_path / "run")]) == EXIT_ERROR
        line = one_line_error(capsys)
        assert f"{path}: {field}:" in line, line
        assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def small_run(micro_zoo, ray_session, tmp_path_factory, repo_root):
    from conftest import write_layerwise_space

    root = tmp_path_factory.mktemp("cli")
    evo.run(config(micro_zoo, write_layerwise_space(root, repo_root)), root / "run", quiet=True)
    return root / "run"


def test_a_closed_pipe_ends_quietly(small_run):
    """`evo status RUN | head -1`: the reader is gone before evo writes; no traceback."""
    child = start_evo("status", small_run, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader leaves before the child has written anything
    err = child.stderr.read().decode()
    assert child.wait() == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(small_run, tmp_path, monkeypatch, capsys):
    import evo.artifacts.release as rel

    def full(root):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "MANIFEST.sha256"))

    monkeypatch.setattr(rel, "write_manifest", full)
    assert cli(["export", str(small_run), str(tmp_path / "rel")]) == EXIT_ERROR
    assert "MANIFEST.sha256: No space left on device" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())  # neither the release nor its staging folder


def test_a_signal_stops_the_run_with_exit_3_and_resume_finishes_it(micro_zoo, ray_session, space_file, tmp_path):
    """A real driver process stopped by SIGINT once its first generation is checkpointed."""
    import signal

    cfg = config(micro_zoo, space_file, optimizer={"name": "ga", "generations": 50, "population": 4,
                                                  "options": {"elites": 1}})
    cfg["ray"] = {**cfg["ray"], "address": ray_session.get_runtime_context().gcs_address}
    path = write(tmp_path, cfg)
    run_dir = tmp_path / "run"
    err = open(tmp_path / "stderr.txt", "w")  # progress bars; kept apart from the table on stdout
    child = start_evo("run", path, "--run-dir", run_dir, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        # the event: the generation table's first row (generation 0 is checkpointed)
        read_until(child.stdout, lambda line: line.split()[:1] == ["0"])
        assert child.poll() is None, "the run ended before it could be stopped"
        child.send_signal(signal.SIGINT)
        rest = child.stdout.read()
        assert child.wait() == EXIT_STOPPED, rest[-2000:] + (tmp_path / "stderr.txt").read_text()[-2000:]
    finally:
        if child.poll() is None:
            child.kill()
        err.close()
    assert f"evo resume {run_dir}" in rest
    store = RunStore.open(run_dir)
    assert 1 <= store.load_checkpoint().generation < 50
    assert "run_finished" not in [e["event"] for e in store.events()]


def test_evaluators_the_cluster_cannot_host_are_refused_not_waited_for(micro_zoo, ray_session, space_file, tmp_path,
                                                                        capsys):
    cfg = config(micro_zoo, space_file)
    cfg["ray"] = {**cfg["ray"], "cpus_per_evaluator": 64}
    assert cli(["run", write(tmp_path, cfg), "--run-dir", str(tmp_path / "run")]) == EXIT_ERROR
    line = one_line_error(capsys)
    assert "2 evaluators need 64 CPUs each; the cluster offers 2 CPUs in all" in line, line
    assert not (tmp_path / "run").exists()


def test_an_address_where_nothing_listens_fails_in_one_line(micro_zoo, space_file, tmp_path):
    """A real driver process (the test session's own Ray would otherwise be reused)."""
    cfg = config(micro_zoo, space_file)
    cfg["ray"] = {**cfg["ray"], "address": "127.0.0.1:1"}
    done = run_evo("run", write(tmp_path, cfg), "--run-dir", tmp_path / "run")
    assert done.returncode == EXIT_ERROR, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("evo: ")]
    assert lines == [lines[0]] and "nothing answers at 127.0.0.1:1" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_sigterm_during_start_up_ends_cleanly(micro_zoo, space_file, tmp_path):
    """SIGTERM as soon as the run has started (sources loading, Ray starting): the driver ends
    like a Ctrl-C, without a traceback, leaving no half-made run directory behind."""
    import signal

    cfg = config(micro_zoo, space_file)
    cfg["ray"] = {**cfg["ray"], "dashboard": False}
    run_dir = tmp_path / "run"
    child = start_evo("run", write(tmp_path, cfg), "--run-dir", run_dir, "--quiet", stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE, text=True)
    events = run_dir / "events.jsonl"
    try:  # the event: the run has begun its start-up
        wait_for(lambda: events.exists() and "run_started" in events.read_text(), child, poll_s=0.01)
        child.send_signal(signal.SIGTERM)
        err = child.communicate()[1]
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode in (130, EXIT_STOPPED), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    if child.returncode == 130:  # stopped before any work: nothing left to refuse a rerun
        assert not run_dir.exists()


def test_an_embedded_ray_listens_on_loopback_only(micro_zoo, space_file, tmp_path):
    """Every listening socket of a run's driver and the Ray it started (GCS, raylet, agents,
    dashboard, evaluator workers) is on 127.0.0.1 / ::1, none on 0.0.0.0, :: or the node IP."""
    import ipaddress
    import signal

    import psutil

    cfg = config(micro_zoo, space_file, optimizer={"name": "random", "generations": 500, "population": 4})
    cfg["ray"] = {**cfg["ray"], "dashboard": True, "dashboard_port": 0}
    run_dir = tmp_path / "run"
    child = start_evo("run", write(tmp_path, cfg), "--run-dir", run_dir, "--quiet", stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE, text=True)
    cache = run_dir / "cache.jsonl"
    try:  # the event: evaluators have scored candidates
        wait_for(lambda: cache.exists() and cache.read_text().count("\n") >= 3, child, poll_s=0.05)
        assert child.poll() is None, child.stderr.read()[-2000:]
        pids = {child.pid} | {p.pid for p in psutil.Process(child.pid).children(recursive=True)}
        listening, exposed = 0, []
        for c in psutil.net_connections(kind="inet"):
            if c.pid in pids and c.status == psutil.CONN_LISTEN:
                listening += 1
                ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
                ip = getattr(ip, "ipv4_mapped", None) or ip  # gRPC's ::ffff:127.0.0.1
                if not ip.is_loopback:
                    exposed.append((c.laddr, psutil.Process(c.pid).name()))
        child.send_signal(signal.SIGTERM)
        child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
    assert listening >= 5 and not exposed, (listening, exposed)  # GCS, raylet, workers, agents at least
