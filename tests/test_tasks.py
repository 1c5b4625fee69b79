"""Task scoring: hand-computed cases on a bigram model, shipped task files, bad-input errors."""
from __future__ import annotations

import json
import math
import pickle
from types import SimpleNamespace

import pytest
import torch
import yaml

from evo.core.errors import EvoError
from evo.scoring.fitness import mean_nll
from evo.scoring.tasks import TASKS, Task, load_task, task_files


# --- tiny real things ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_tok():
    """A byte-level tokenizer with no merges: one token per UTF-8 byte (259 ids with specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|pad|>", "<|bos|>", "<|eos|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>")


class Bigram(torch.nn.Module):
    """Logits depend on the current token only: ``table[token]``; no cache, any length."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


def tid(tok, ch: str) -> int:
    (i,) = tok(ch, add_special_tokens=False)["input_ids"]
    return i


def write_task(tmp_path, spec: dict, records: list | str, name: str = "data.jsonl"):
    data = tmp_path / name
    if isinstance(records, str):
        data.write_text(records, encoding="utf-8")
    else:
        data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({"task": "t", "dataset_file": name, **spec}, sort_keys=False), encoding="utf-8")
    return path


MC = {"type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "choices", "doc_to_target": "label",
      "target_delimiter": ""}


# --- multiple choice ----------------------------------------------------------------------------

def test_registry_names_every_kind():
    assert set(TASKS) == {"multiple_choice", "exact_match", "perplexity"}
    assert all(issubclass(cls, Task) and cls.goal in ("maximize", "minimize") for cls in TASKS.values())


def test_multiple_choice_acc_picks_the_likeliest_choice(tmp_path, byte_tok):
    table = torch.zeros(len(byte_tok), len(byte_tok))
    table[:, tid(byte_tok, "x")] = 4.0                  # after anything, "x" is likely
    records = [{"q": "Q:", "choices": ["x", "y"], "label": 0},       # right
               {"q": "Q:", "choices": ["x", "y"], "label": 1},       # wrong
               {"q": "Q:", "choices": ["y", "z", "x"], "label": "x"}]  # gold given as text
    task = load_task(write_task(tmp_path, MC, records), byte_tok)
    assert (task.kind, task.metric, task.goal, len(task)) == ("multiple_choice", "acc", "maximize", 3)
    result = task.score(Bigram(table), batch_size=2)
    assert result == {"value": pytest.approx(2 / 3), "per_item": [1.0, 0.0, 1.0], "n": 3}
    assert task.score(Bigram(table), items=[1, 2]) == {"value": 0.5, "per_item": [0.0, 1.0], "n": 2}
    lp = torch.log_softmax(table[0], -1)
    assert task.loglikelihoods(Bigram(table), items=[0])[0] == pytest.approx(
        [float(lp[tid(byte_tok, "x")]), float(lp[tid(byte_tok, "y")])], abs=1e-5)


def test_acc_norm_divides_by_choice_bytes(tmp_path, byte_tok):
    # "x" is cheap, every other byte dear: eight x's lose on the sum, win per byte.
    table = torch.zeros(len(byte_tok), len(byte_tok))
    table[:, tid(byte_tok, "x")] = 5.0
    lp = torch.log_softmax(table[0], -1)
    lp_x, lp_b = float(lp[tid(byte_tok, "x")]), float(lp[tid(byte_tok, "b")])
    assert 8 * lp_x < lp_b and lp_x > lp_b                 # the case is what it claims to be
    records = [{"q": "Q:", "choices": ["xxxxxxxx", "b"], "label": 0}]
    acc = load_task(write_task(tmp_path, MC, records), byte_tok)
    norm = load_task(write_task(tmp_path, {**MC, "metric": "acc_norm"}, records), byte_tok)
    assert norm.metric == "acc_norm"
    assert acc.score(Bigram(table))["per_item"] == [0.0]
    assert norm.score(Bigram(table))["per_item"] == [1.0]


def test_templates_delimiter_and_choice_lists(tmp_path, byte_tok):
    spec = {"type": "multiple_choice", "doc_to_text": "{{a.b}} is", "target_delimiter": " ",
            "doc_to_choice": ["{{opts[0]}}{{tail}}", "{{opts.1}}{{tail}}"], "doc_to_target": "{{gold}}"}
    task = load_task(write_task(tmp_path, spec, [{"a": {"b": "Sky"}, "opts": ["blue", "red"], "tail": ".",
                                                  "gold": 1}]), byte_tok)
    decode = byte_tok.decode
    assert decode(task.contexts[0]) == "Sky is"
    assert [decode(c) for c in task.continuations[0]] == [" blue.", " red."]
    assert task.golds == [1] and task.choice_bytes == [[5, 4]]


def test_lm_eval_jinja_idioms(tmp_path, byte_tok):
    """What lm-eval task files write: a template that renders the choice list as a literal, a
    string or integer target, filters and conditionals."""
    spec = {"type": "multiple_choice", "doc_to_text": "{% if ctx %}{{ ctx }} {% endif %}{{ q | upper }}:",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "target_delimiter": " "}
    rows = [{"ctx": "", "q": "sky", "choices": ["blue", "it's red"], "answer": 1},
            {"ctx": "Grass", "q": "is", "choices": ["green", "blue"], "answer": "green"}]
    task = load_task(write_task(tmp_path, spec, rows), byte_tok)
    decode = byte_tok.decode
    assert [decode(c) for c in task.contexts] == ["SKY:", "Grass IS:"]
    assert [decode(c) for c in task.continuations[0]] == [" blue", " it's red"]
    assert task.golds == [1, 0]
    # a template that renders no list for doc_to_choice is still a one-line error
    bad = write_task(tmp_path, {**spec, "doc_to_choice": "{{ q }}"}, rows[:1])
    assert "must give a list of choices" in error_of(bad, byte_tok)


def test_multiple_choice_truncates_to_the_model_window(tmp_path, byte_tok):
    table = torch.zeros(len(byte_tok), len(byte_tok))
    model = Bigram(table)
    model.config = SimpleNamespace(max_position_embeddings=4)
    task = load_task(write_task(tmp_path, MC, [{"q": "a long context", "choices": ["ab", "cdefgh"], "label": 0}]),
                     byte_tok)
    ll = task.loglikelihoods(model)[0]
    assert ll == pytest.approx([2 * -math.log(len(byte_tok)), 4 * -math.log(len(byte_tok))], abs=1e-4)


# --- exact match --------------------------------------------------------------------------------

def chain(tok, pairs: dict[str, str], eos_after: str | None = None) -> Bigram:
    """A model that, after byte ``a``, always says ``pairs[a]`` (and EOS after ``eos_after``)."""
    table = torch.zeros(len(tok), len(tok))
    for a, b in pairs.items():
        table[tid(tok, a), tid(tok, b)] = 10.0
    if eos_after is not None:
        table[tid(tok, eos_after), tok.eos_token_id] = 20.0
    return Bigram(table)


EM = {"type": "exact_match", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}", "until": ["\n"], "max_gen_toks": 6}


def test_exact_match_cuts_at_stop_sequence(tmp_path, byte_tok):
    model = chain(byte_tok, {":": " ", " ": "4", "4": "2", "2": "\n", "\n": "7", "7": "7", "=": "Y", "Y": "e",
                             "e": "s", "s": ".", ".": "."})
    records = [{"q": "What is 40 + 2?:", "a": "42"}, {"q": "1:", "a": "41"}, {"q": "Ok=", "a": "yes"}]
    task = load_task(write_task(tmp_path, EM, records), byte_tok)
    assert (task.kind, task.metric, task.goal) == ("exact_match", "exact_match", "maximize")
    assert task.generate(model, batch_size=2) == [" 42", " 42", "Yes..."]
    assert task.score(model, batch_size=2) == {"value": pytest.approx(1 / 3), "per_item": [1.0, 0.0, 0.0], "n": 3}
    assert task.score(model, items=[1]) == {"value": 0.0, "per_item": [0.0], "n": 1}

    loose = load_task(write_task(tmp_path, {**EM, "until": ["7", "."], "ignore_case": True, "regex": r"-?\d+|[A-Za-z]+"},
                                 records), byte_tok)
    assert loose.generate(model) == [" 42\n", " 42\n", "Yes"]
    assert loose.score(model)["per_item"] == [1.0, 0.0, 1.0]


def test_exact_match_stops_at_eos_and_pickles(tmp_path, byte_tok):
    model = chain(byte_tok, {":": "4", "4": "2"}, eos_after="2")
    task = load_task(write_task(tmp_path, EM, [{"q": ":", "a": "42"}]), byte_tok)
    assert task.generate(model) == ["42"]
    clone = pickle.loads(pickle.dumps(task))
    assert clone.score(model)["per_item"] == [1.0]


# --- perplexity ---------------------------------------------------------------------------------

def test_perplexity_of_a_uniform_model_is_log_vocab(tmp_path, byte_tok):
    (tmp_path / "text.txt").write_text("abcdefgh" * 20, encoding="utf-8")
    path = tmp_path / "ppl.yaml"
    path.write_text("task: p\ntype: perplexity\ndataset_file: text.txt\nseq_len: 16\n", encoding="utf-8")
    task = load_task(path, byte_tok)
    assert (task.kind, task.metric, task.goal, len(task)) == ("perplexity", "logppl", "minimize", 10)
    result = task.score(Bigram(torch.zeros(len(byte_tok), len(byte_tok))), batch_size=3, items=[0, 4, 9])
    assert result["n"] == 3 and result["value"] == pytest.approx(math.log(len(byte_tok)))
    assert len(load_task(path, byte_tok, limit=4)) == 4


def test_perplexity_matches_fitness_mean_nll(tmp_path, micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_zoo.base_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir).eval()
    records = [{"text": t} for t in micro_zoo.texts("doc", "test")]
    task = load_task(write_task(tmp_path, {"type": "perplexity", "seq_len": 32, "max_blocks": 6}, records), tok)
    assert task.score(model, batch_size=4)["value"] == pytest.approx(mean_nll(model, task.blocks), rel=1e-5)


def test_nan_logits_raise(tmp_path, byte_tok):
    table = torch.full((len(byte_tok), len(byte_tok)), float("nan"))
    mc = load_task(write_task(tmp_path, MC, [{"q": "Q:", "choices": ["x", "y"], "label": 0}]), byte_tok)
    em = load_task(write_task(tmp_path, EM, [{"q": "Q:", "a": "x"}]), byte_tok)
    for task in (mc, em):
        with pytest.raises(FloatingPointError, match="NaN"):
            task.score(Bigram(table))
    with pytest.raises(IndexError, match="out of range"):
        mc.score(Bigram(table), items=[1])


# --- shipped tasks, micro zoo -------------------------------------------------------------------

def shipped(repo_root):
    files = task_files(repo_root / "tasks")
    assert len(files) >= 4, files
    return files


def test_shipped_tasks_load_and_score(repo_root, micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_zoo.base_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir).eval()
    for path in shipped(repo_root):
        task = load_task(path, tok)
        assert len(task) >= 200, path
        result = task.score(model, batch_size=16, items=range(10))
        assert result["n"] == 10 and 0.0 <= result["value"] <= 1.0, path
        assert set(result["per_item"]) <= {0.0, 1.0}


def test_batching_and_kv_cache_do_not_change_results(repo_root, micro_zoo):
    """Padding (right for choices, left for generation) and the KV cache must be invisible."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_zoo.base_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.base_dir).eval()

    class NoCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            kwargs["use_cache"] = False
            return SimpleNamespace(logits=self.inner(**kwargs).logits)

    em = load_task(repo_root / "tasks" / "arithmetic" / "arithmetic_em.yaml", tok, limit=4)
    em.max_gen_toks = 4
    batched = em.generate(model, batch_size=4)
    assert batched == em.generate(model, batch_size=1) == em.generate(NoCache(model), batch_size=4)
    mc = load_task(repo_root / "tasks" / "prose_cloze" / "prose_cloze.yaml", tok, limit=3)
    one, many = mc.loglikelihoods(model, batch_size=1), mc.loglikelihoods(model, batch_size=12)
    assert [pytest.approx(row, abs=1e-4) for row in one] == many


# --- bad input: one line naming file and line -------------------------------------------------

def error_of(path, tok) -> str:
    with pytest.raises(EvoError) as info:
        load_task(path, tok)
    message = str(info.value)
    assert "\n" not in message
    return message


GOOD = {"q": "Q:", "choices": ["x", "y"], "label": 0}


@pytest.mark.parametrize("spec, data, line, words", [
    (MC, json.dumps(GOOD) + "\n{not json\n", 2, "malformed JSON"),
    ({**MC, "doc_to_text": "{{ q.__class__.__mro__ }}"}, json.dumps(GOOD) + "\n", 1, "unsafe"),
    (MC, json.dumps(GOOD) + "\n" + json.dumps({"q": "Q:", "label": 0}) + "\n", 2, "names field 'choices'"),
    (MC, json.dumps({**GOOD, "label": 2}) + "\n", 1, "answer index 2 out of range"),
    (MC, json.dumps({**GOOD, "label": "w"}) + "\n", 1, "not one of the choices"),
    (MC, "\n", 1, "empty task"),
    ({**MC, "doc_to_text": "{{question}}"}, json.dumps(GOOD) + "\n", 1, "names field 'question'"),
    ({**EM, "doc_to_target": "{{answer}}"}, json.dumps({"q": "Q:", "a": "1"}) + "\n", 1, "names field 'answer'"),
])
def test_bad_records_name_file_and_line(tmp_path, byte_tok, spec, data, line, words):
    message = error_of(write_task(tmp_path, spec, data), byte_tok)
    assert f"data.jsonl:{line}:" in message and words in message


@pytest.mark.parametrize("spec, key, words", [
    ({**MC, "type": "ranking"}, "type", "unknown task type 'ranking'"),
    ({**MC, "doc_to_txt": "{{q}}"}, "doc_to_txt", "unknown key 'doc_to_txt'"),
    ({**MC, "metric": "f1"}, "metric", "unknown metric 'f1'"),
    ({**MC, "dataset_file": "missing.jsonl"}, "dataset_file", "not found"),
    ({**EM, "regex": "("}, "regex", "invalid regex"),
])
def test_bad_task_files_name_the_key_line(tmp_path, byte_tok, spec, key, words):
    path = write_task(tmp_path, spec, [GOOD])
    line = 1 + next(i for i, text in enumerate(path.read_text().splitlines()) if text.startswith(f"{key}:"))
    message = error_of(path, byte_tok)
    assert f"task.yaml:{line}:" in message and words in message


def test_lm_eval_adapter_refuses_cleanly_without_lm_eval(byte_tok, monkeypatch):
    import importlib.util

    from evo.scoring.tasks import lm_eval_adapter

    real = importlib.util.find_spec
    # a machine without lm-eval (CI installs it for the parity tests below)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert not lm_eval_adapter.lm_eval_available()
    with pytest.raises(EvoError, match="pip install lm-eval"):
        lm_eval_adapter.evaluate_lm_eval(None, byte_tok, ["arc_easy"])


@pytest.mark.parametrize("style", ["fields", "jinja"])
def test_multiple_choice_scores_match_lm_eval(micro_zoo, repo_root, tmp_path, monkeypatch, style):
    """The same lm-eval-style task file, the same model: evo's acc and acc_norm equal
    lm-evaluation-harness's (runs only where ``pip install -e '.[lm-eval]'`` was done), with bare
    field names and with the Jinja idiom ``doc_to_choice: "{{choices}}"`` (a rendered list literal)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # local JSON only; never the hub
        monkeypatch.setenv(var, "1")
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evo.scoring.tasks.lm_eval_adapter import evaluate_lm_eval

    data = repo_root / "tasks" / "arithmetic" / "arithmetic.jsonl"
    spec = {"task": "evo_parity_arith", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}} Answer:",
            "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": " ",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    if style == "jinja":
        spec.update(doc_to_text="{{ question | trim }} Answer:", doc_to_choice="{{choices}}", doc_to_target="{{label}}")
    (tmp_path / "evo_parity_arith.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    tok = AutoTokenizer.from_pretrained(micro_zoo.base_dir)
    model = AutoModelForCausalLM.from_pretrained(micro_zoo.specialist_dirs["code"]).eval()
    theirs = evaluate_lm_eval(model, tok, ["evo_parity_arith"], include_path=tmp_path, limit=60,
                              batch_size=4)["evo_parity_arith"]
    for metric in ("acc", "acc_norm"):
        one = tmp_path / f"{metric}.yaml"
        one.write_text(yaml.safe_dump({**spec, "metric_list": [{"metric": metric}]}, sort_keys=False))
        ours = load_task(one, tok, limit=60).score(model, batch_size=4)["value"]
        assert ours == pytest.approx(theirs[metric], abs=1e-9), (metric, ours, theirs)
    assert 0.0 < theirs["acc"] < 1.0  # not a degenerate all-right / all-wrong comparison
