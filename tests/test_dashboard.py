"""The dashboard shows the population: named candidate tasks through the state API (with Ray's
auth token), and the page renders in headless Chromium."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.request

import pytest
import yaml

from conftest import evo_env, start_evo, wait_for
from evo.artifacts.store import RunStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, token):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_state_api_lists_named_candidate_tasks(micro_zoo, repo_root, tmp_path):
    port, metrics_port = _free_port(), _free_port()
    token = "evo-test-" + str(port)
    space = yaml.safe_load((repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml").read_text())
    space["layer_groups"] = 2
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    cfg = {"zoo": str(micro_zoo.root), "search_space": str(tmp_path / "space.yaml"),
           "eval": {"seq_len": 64, "max_blocks": 32, "batch_size": 8},
           "optimizer": {"name": "random", "generations": 400, "population": 4},
           "ray": {"evaluators": 1, "cpus_per_evaluator": 0.5, "dashboard": True, "dashboard_port": port,
                   "metrics_export_port": metrics_port}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    child = start_evo("run", tmp_path / "exp.yaml", "--run-dir", tmp_path / "run", "--quiet",
                      env=evo_env(RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0"),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        # wait on the run, not on a clock: it is 400 generations long, so a name (or a metric) that
        # never shows fails when the child ends, and a loaded machine only makes the wait longer
        names: set[str] = set()

        def second_generation_listed() -> bool:  # the state API names generation 1's tasks
            nonlocal names
            try:
                tasks = _get(f"{base}/api/v0/tasks?limit=1000", token)["data"]["result"]["result"]
                names = {t["name"] for t in tasks}
            except Exception:
                pass
            return any(n.startswith("g0001-c") for n in names)

        wait_for(second_generation_listed, child, poll_s=1)
        assert any(n.startswith("g0000-c000") or n.startswith("g0001-c") for n in names), child.stdout.read()[-2000:] if child.poll() is not None else names
        one = _get(f"{base}/api/v0/tasks?filter_keys=name&filter_predicates=%3D&filter_values=g0000-c000", token)
        assert [t["name"] for t in one["data"]["result"]["result"]] == ["g0000-c000"]
        # the run records (and, without --quiet, prints) where its dashboard listens
        started = [e for e in RunStore(tmp_path / "run").events() if e["event"] == "ray_started"]
        assert started and started[0]["dashboard"] == base, started
        actors = _get(f"{base}/api/v0/actors?limit=100", token)["data"]["result"]["result"]
        assert any("evaluator-0" in (a.get("name") or "") for a in actors)
        # the run's own metrics (ray.util.metrics) are on the node's Prometheus port
        text = ""

        def generation_exported() -> bool:  # the node's Prometheus page has the run's generation gauge
            nonlocal text
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
                    text = resp.read().decode()
            except Exception:
                pass
            return "ray_evo_generation{" in text

        wait_for(generation_exported, child, poll_s=2)
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_evo_")]
        assert any(ln.startswith("ray_evo_generation{") and 'run="run"' in ln for ln in lines), lines or text[-1500:]
        assert any(ln.startswith("ray_evo_evaluations_total{") and 'status="ok"' in ln for ln in lines), lines
        assert any(ln.startswith("ray_evo_objective_best{") and 'objective="mean_logppl"' in ln for ln in lines), lines
        # without the token the dashboard refuses
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{base}/api/v0/tasks", timeout=10)
        if shutil.which("chromium"):
            shot = tmp_path / "dashboard.png"
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                            "--disable-component-update", "--disable-sync", "--no-first-run",
                            f"--user-data-dir={tmp_path / 'chrome'}", f"--screenshot={shot}", "--window-size=1280,900",
                            f"{base}/#/actors"], check=True, capture_output=True, timeout=120)
            assert shot.stat().st_size > 10_000
    finally:
        child.terminate()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
    assert child.returncode == 3, child.stdout.read()[-2000:]  # SIGTERM: stopped, checkpointed, resumable


def test_grafana_dashboard_queries_only_metrics_evo_exports(repo_root):
    """The shipped Grafana JSON parses and every ray_evo_* series it queries is one evo.cluster.metrics
    defines (a renamed metric would leave an empty panel)."""
    import re

    import evo.cluster.metrics

    dash = json.loads((repo_root / "docs" / "grafana" / "evo_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"ray_(evo_[a-z_]+)", e)}
    source = (repo_root / "evo" / "cluster" / "metrics.py").read_text()
    defined = set(re.findall(r'(?:Gauge|Counter|Histogram)\("(evo_[a-z_]+)"', source))
    assert defined >= {"evo_generation", "evo_evaluations", "evo_objective_best", "evo_objective_mean", "evo_data_version"}
    # Prometheus adds _total to counters
    assert {m.removesuffix("_total") for m in used} <= defined, used
    assert len(dash["panels"]) >= 5
    # and RunMetrics really registers those series under the names the panels query
    run_metrics = evo.cluster.metrics.RunMetrics("t", ["mean_logppl"])
    registered = {m.info["name"] for m in vars(run_metrics).values() if hasattr(m, "info")}
    assert registered >= {m.removesuffix("_total") for m in used}, (registered, used)
