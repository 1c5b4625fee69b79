"""Releases: export from a micro run, load with transformers, verify, detect corruption; an
interrupted export leaves nothing; bad targets are one-line errors; the report renders."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

import evo
from evo.cli import main as cli
from evo.core.errors import EvoError
from evo.artifacts.verify import verify
from evo.artifacts.store import RunStore


@pytest.fixture(scope="module")
def finished_run(micro_zoo, ray_session, tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("release")
    space = yaml.safe_load((repo_root / "search_spaces" / "ties_layerwise.yaml").read_text())
    space["layer_groups"] = 2
    (root / "space.yaml").write_text(yaml.safe_dump(space))
    cfg = {
        "zoo": str(micro_zoo.root), "search_space": str(root / "space.yaml"),
        "eval": {"seq_len": 32, "max_blocks": 4, "batch_size": 4},
        "optimizer": {"name": "ga", "generations": 2, "population": 4, "options": {"elites": 1}},
        "ray": {"evaluators": 2, "cpus_per_evaluator": 0.5}, "seed": 1,
    }
    evo.run(cfg, root / "run", quiet=True)
    return root / "run"


def test_export_loads_verifies_and_detects_a_flipped_byte(finished_run, tmp_path, capsys):
    release = evo.export(finished_run, tmp_path / "rel")
    names = {p.name for p in release.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "mergekit.yaml",
            "fitness.json", "README.md", "MANIFEST.sha256"} <= names
    assert "ties" in (release / "README.md").read_text()
    # shipped as any other output: the umask's modes, and parents named without the builder's paths
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(release.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE((release / n).stat().st_mode) for n in ("fitness.json", "README.md", "MANIFEST.sha256",
                                                                  "model.safetensors")} == {0o666 & ~mask}
    zoo_root = str(Path(yaml.safe_load((finished_run / "config.yaml").read_text())["zoo"]).resolve())
    for name in ("README.md", "mergekit.yaml"):
        text = (release / name).read_text()
        assert zoo_root not in text and "micro/specialists/" in text, name
    AutoModelForCausalLM.from_pretrained(release)
    values = verify(release)
    assert cli(["verify", str(release)]) == 0
    out = capsys.readouterr().out  # says which text the re-measured values are on
    assert "OK" in out and "on the selection split: documents of the evaluation sets' files held out" in out
    card = (release / "README.md").read_text()
    if "Margin in mean log-perplexity" in card:  # the margins' intervals: stratified, and over which text
        assert "stratified by evaluation set" in card and "- selection: documents of the evaluation sets'" in card

    blob = bytearray((release / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (release / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(EvoError, match="model.safetensors: sha256 does not match"):
        verify(release)
    assert cli(["verify", str(release)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256 does not match" in err
    assert values


def test_verify_re_measures_fitness(finished_run, tmp_path):
    """A release whose weights changed (manifest rewritten to match) fails on fitness."""
    from safetensors.torch import load_file, save_file

    from evo.artifacts.manifest import write_manifest

    release = evo.export(finished_run, tmp_path / "rel")
    sd = load_file(release / "model.safetensors")
    name = next(k for k in sd if "embed_tokens" in k)
    sd[name] = sd[name] * 3
    save_file(sd, release / "model.safetensors", metadata={"format": "pt"})
    write_manifest(release)
    with pytest.raises(EvoError, match="re-measured"):
        verify(release)


def test_verify_checks_the_manifest_is_complete_and_the_only_files(finished_run, tmp_path, capsys):
    """Emptied manifest, removed lines with edited files, an unlisted file, a broken
    fitness.json: each fails verify with one line."""
    import shutil

    from evo.artifacts.manifest import MANIFEST, write_manifest

    release = evo.export(finished_run, tmp_path / "rel")
    verify(release)

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(release, d)
        return d

    emptied = fresh("emptied")
    (emptied / MANIFEST).write_text("")
    with pytest.raises(EvoError, match="incomplete manifest"):
        verify(emptied)

    # a line removed and that file edited (the footer no longer matches the listing)
    cut = fresh("cut")
    lines = (cut / MANIFEST).read_text().splitlines()
    (cut / MANIFEST).write_text("\n".join(ln for ln in lines if not ln.endswith("  recipe.yaml")) + "\n")
    (cut / "recipe.yaml").write_text("tampered: true\n")
    with pytest.raises(EvoError, match="does not match its footer"):
        verify(cut)

    # every line removed but a footer forged for the empty list: the files are then unlisted
    forged = fresh("forged")
    import hashlib

    (forged / MANIFEST).write_text(f"# files: 0 {hashlib.sha256(b'').hexdigest()}\n")
    with pytest.raises(EvoError, match="not listed in"):
        verify(forged)

    extra = fresh("extra")
    (extra / "evil.py").write_text("import os\n")
    with pytest.raises(EvoError, match="evil.py: not listed in"):
        verify(extra)
    capsys.readouterr()
    assert cli(["verify", str(extra)]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    for name, content, match in (("nofit", None, "fitness.json: missing"), ("badjson", "{not json", "not valid JSON"),
                                 ("nofield", "{}", "missing field")):
        d = fresh(name)
        if content is None:
            (d / "fitness.json").unlink()
        else:
            (d / "fitness.json").write_text(content)
        write_manifest(d)
        with pytest.raises(EvoError, match=match):
            verify(d)
        capsys.readouterr()
        assert cli(["verify", str(d)]) == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_interrupted_export_leaves_no_release(finished_run, tmp_path, monkeypatch):
    import evo.artifacts.release as rel

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rel, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        evo.export(finished_run, tmp_path / "v0009")
    assert list(tmp_path.iterdir()) == []


def test_export_bad_targets(finished_run, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(EvoError, match="already exists"):
        evo.export(finished_run, tmp_path / "exists")
    # /proc refuses new entries even to root: a read-only target
    with pytest.raises(EvoError, match="not writable"):
        evo.export(finished_run, "/proc/evo-release/v0001")
    assert not os.path.exists("/proc/evo-release")
    # a release name is one folder under RUN_DIR/releases: separators and dot-names are refused
    for bad in ("../escape", "a/b", "..", ".hidden", "x\\y"):
        with pytest.raises(EvoError, match="no path separators"):
            evo.export(finished_run, name=bad)
    assert not (finished_run.parent / "escape").exists()


def test_cli_export_one_line_errors(finished_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    RunStore.create(empty, {"name": "x"})
    assert cli(["export", str(empty)]) == 2
    assert "no complete generation" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_status_and_report(finished_run, capsys):
    assert cli(["status", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "generation 2/2" in out and "best:" in out
    cands = RunStore.open(finished_run).candidates()
    n_failed, n_rejected = (sum(c["status"] == s for c in cands) for s in ("failed", "rejected"))
    assert f"(failed {n_failed}, stopped early {n_rejected}, " in out  # a rejection is not a failure
    page = evo.report(finished_run)
    html = page.read_text()
    for section in ("Fitness per generation", "Gene distributions", "Lineage of the best", "Comparison"):
        assert section in html
    assert html.count("data:image/png;base64,") >= 3
    assert (page.parent / "fitness.png").stat().st_size > 5000


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    page = evo.report(finished_run)
    shot = tmp_path / "report.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}",
         f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    assert shot.stat().st_size > 50_000  # a blank page is a few KB; plots make it large
