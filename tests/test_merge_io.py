"""merge_to_dir end to end on micro Llama models, and every bad input it must refuse cleanly."""

import math
import os
import pickle
import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from evo.core.errors import EvoError
from evo.merge import MergeConfig, Merger, load_model_dir, merge_to_dir, task_vectors

from conftest import mergekit_yaml_tensors, write_llama as _llama

TIES_YAML = """\
merge_method: ties
base_model: base
models:
  - model: base
  - model: a
    parameters:
      weight: [0.3, 0.9]
      density: 0.5
  - model: b
    parameters:
      weight:
        - filter: mlp
          value: 0.8
        - value: 0.4
      density: 0.7
parameters:
  normalize: true
dtype: float32
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_zoo")
    for i, name in enumerate(["base", "a", "b"]):
        _llama(root / name, i)
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    _llama(root / "wide", 3, intermediate_size=40)
    _llama(root / "bigvocab", 4, vocab_size=72)
    return root


def _no_leftovers(parent, name):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp")]


def test_yaml_to_dir_loads_and_equals_in_memory_merge(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "ties.yaml").write_text(TIES_YAML)
    cfg = MergeConfig.from_yaml(tmp_path / "ties.yaml")
    out = merge_to_dir(cfg, tmp_path / "merged", resolve=lambda n: zoo / n, seed=0)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    base, _ = load_model_dir(zoo / "base")
    models = {m: load_model_dir(zoo / m)[0] for m in ("a", "b")}
    expected = Merger(base, task_vectors(base, models), num_layers=2).merge(cfg)
    got = model.state_dict()
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_bfloat16_output_and_no_base_linear(zoo, tmp_path):
    cfg = MergeConfig.from_dict({"merge_method": "linear", "dtype": "bfloat16",
                                 "models": [{"model": "a", "parameters": {"weight": 1}},
                                            {"model": "b", "parameters": {"weight": 1}}]})
    out = merge_to_dir(cfg, tmp_path / "lin", resolve=lambda n: zoo / n)
    got = load_file(str(out / "model.safetensors"))
    a, b = load_file(str(zoo / "a" / "model.safetensors")), load_file(str(zoo / "b" / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    assert got[name].dtype == torch.bfloat16
    torch.testing.assert_close(got[name].float(), ((a[name] + b[name]) / 2), atol=1e-2, rtol=1e-2)


def test_matches_mergekit_yaml_end_to_end(zoo, tmp_path):
    text = TIES_YAML.replace("base_model: base", f"base_model: {zoo / 'base'}")
    for m in ("base", "a", "b"):
        text = text.replace(f"model: {m}\n", f"model: {zoo / m}\n")
    (tmp_path / "mk.yaml").write_text(text)
    ref = mergekit_yaml_tensors(tmp_path / "mk.yaml", tmp_path / "mk_out")
    ours = merge_to_dir(MergeConfig.from_yaml(tmp_path / "mk.yaml"), tmp_path / "ours")
    got = load_file(str(ours / "model.safetensors"))
    assert set(ref) == set(got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


NEW_METHOD_YAMLS = {
    "sce": "merge_method: sce\nbase_model: base\nparameters: {select_topk: 0.5}\nmodels: [{model: a}, {model: b}]\n",
    "nearswap": "merge_method: nearswap\nbase_model: base\nparameters: {t: 0.002}\nmodels: [{model: a}]\n",
    "multislerp": ("merge_method: multislerp\nbase_model: base\n"
                   "models: [{model: a, parameters: {weight: 0.7}}, {model: b, parameters: {weight: 0.4}}]\n"),
    "karcher": "merge_method: karcher\nbase_model: base\nmodels: [{model: a}, {model: b}]\n",
    "passthrough": "merge_method: passthrough\nmodels: [{model: a, parameters: {scale: 0.5}}]\n",
    "ram": "merge_method: ram\nbase_model: base\nparameters: {epsilon: 0.002}\nmodels: [{model: a}, {model: b}]\n",
    "ramplus_tl": ("merge_method: ramplus_tl\nbase_model: base\nparameters: {epsilon: 0.002, r: 0.5, alpha: 0.9}\n"
                   "models: [{model: a}, {model: b}]\n"),
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: base\nmodels: [{model: a}]\n",
}


@pytest.mark.parametrize("method", sorted(NEW_METHOD_YAMLS))
def test_added_methods_match_mergekit_yaml_end_to_end(zoo, tmp_path, method):
    """The methods added after the first twelve, as whole models: the same YAML through
    `mergekit-yaml` and `evo merge` gives the same tensors."""
    ref, got = _mergekit_and_evo(zoo, tmp_path, NEW_METHOD_YAMLS[method])
    for name in ref:
        # karcher: mergekit iterates over whole float32 tensors, evo on the float64 Gram matrix (~2e-6 apart)
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5, msg=f"{method}: {name}")


def _mergekit_and_evo(zoo, tmp_path, text: str) -> tuple[dict, dict]:
    """The same YAML (model names a, b, base made paths into ``zoo``) through `mergekit-yaml` and
    `evo merge`: their tensors, checked to have the same names."""
    text = text.replace("base_model: base", f"base_model: {zoo / 'base'}")
    for m in ("base", "a", "b"):
        text = text.replace(f"model: {m}}}", f"model: {zoo / m}}}").replace(f"model: {m},", f"model: {zoo / m},")
    (tmp_path / "mk.yaml").write_text(text)
    ref = mergekit_yaml_tensors(tmp_path / "mk.yaml", tmp_path / "mk_out")
    assert cli_merge(tmp_path / "mk.yaml", tmp_path / "ours") == 0
    got = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ref) == set(got)
    return ref, got


SLICE_YAMLS = {
    # a frankenmerge: a's two layers, then b's second layer again (3 layers out of 2-layer models)
    "stack": ("merge_method: passthrough\nslices:\n"
              "  - sources: [{model: a, layer_range: [0, 2]}]\n"
              "  - sources: [{model: b, layer_range: [1, 2], parameters: {scale: 0.5}}]\n"),
    # a merge inside each slice, with a per-slice gradient and a base named per slice
    "ties_slices": ("merge_method: ties\nbase_model: base\nparameters: {normalize: true}\nslices:\n"
                    "  - sources: [{model: base, layer_range: [0, 2]}, {model: a, layer_range: [0, 2]},"
                    " {model: b, layer_range: [0, 2]}]\n"
                    "    parameters: {weight: [0.2, 0.9], density: 0.6}\n"
                    "  - sources: [{model: base, layer_range: [1, 2]}, {model: b, layer_range: [0, 1]}]\n"
                    "    parameters: {weight: 0.7, density: 0.8}\n"),
}


@pytest.mark.parametrize("which", sorted(SLICE_YAMLS))
def test_slices_match_mergekit_yaml(zoo, tmp_path, which):
    """mergekit's ``slices:``: the same layers, in the same order, the same tensors and depth."""
    ref, got = _mergekit_and_evo(zoo, tmp_path, SLICE_YAMLS[which])
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=f"{which}: {name}")
    depth = lambda d: json.loads((tmp_path / d / "config.json").read_text())["num_hidden_layers"]  # noqa: E731
    assert depth("ours") == depth("mk_out") == 3  # both recipes stack 2 + 1 layers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")  # a plain transformers model of the new depth
    assert len(model.model.layers) == depth("ours")


def cli_merge(config, out) -> int:
    from evo.cli import main

    return main(["merge", str(config), str(out)])


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_bfloat16_merge_is_the_float32_merge_rounded_once_and_matches_mergekit(zoo, tmp_path, method):
    """evo computes every tensor in float32 and rounds once; mergekit rounds its inputs and
    intermediates in bf16, so against mergekit-yaml the bf16 outputs agree within 2 bf16 steps at
    each tensor's largest magnitude."""
    base = f"base_model: {zoo / 'base'}\n" if method == "task_arithmetic" else ""
    text = (f"merge_method: {method}\n{base}dtype: DTYPE\nmodels:\n"
            f"  - model: {zoo / 'a'}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {zoo / 'b'}\n    parameters: {{weight: 0.7}}\n")
    got = {}
    for dtype in ("float32", "bfloat16"):
        (tmp_path / f"{dtype}.yaml").write_text(text.replace("DTYPE", dtype))
        out = merge_to_dir(MergeConfig.from_yaml(tmp_path / f"{dtype}.yaml"), tmp_path / f"evo-{dtype}")
        got[dtype] = load_file(str(out / "model.safetensors"))
    for name, t in got["float32"].items():
        assert got["bfloat16"][name].dtype == torch.bfloat16
        assert torch.equal(got["bfloat16"][name], t.to(torch.bfloat16)), name  # one rounding, exactly
    pytest.importorskip("mergekit", reason="mergekit is not installed (optional oracle)")
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        pytest.skip("mergekit-yaml entry point not on PATH")
    subprocess.run([exe, str(tmp_path / "bfloat16.yaml"), str(tmp_path / "mk"), "--no-lazy-unpickle"],
                   check=True, capture_output=True, timeout=300)
    ref = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        ref.update(load_file(str(f)))
    assert set(ref) == set(got["bfloat16"])
    for name, r in ref.items():
        assert r.dtype == torch.bfloat16, name
        scale = r.float().abs().max().item()
        step = 2.0 ** (math.floor(math.log2(scale)) - 7) if scale > 0 else 0.0  # one bf16 step at that magnitude
        diff = (got["bfloat16"][name].float() - r.float()).abs().max().item()
        assert diff <= 2 * step, (name, diff, scale)


def _ties(base="base", a="a"):
    return MergeConfig.from_dict({"merge_method": "ties", "base_model": base,
                                  "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}}]})


def test_missing_model_dir(zoo, tmp_path):
    with pytest.raises(EvoError, match="nowhere: model directory not found"):
        merge_to_dir(_ties(a="nowhere"), tmp_path / "o", resolve=lambda n: zoo / n)
    assert _no_leftovers(tmp_path, "o")


@pytest.mark.parametrize("other, message", [("wide", r"mlp\..*_proj\.weight has shape"),
                                            ("bigvocab", r"embed_tokens\.weight has 72 vocabulary rows")])
def test_shape_and_vocab_mismatch(zoo, tmp_path, other, message):
    with pytest.raises(EvoError, match=message):
        merge_to_dir(_ties(a=other), tmp_path / "o", resolve=lambda n: zoo / n)
    assert _no_leftovers(tmp_path, "o")


class _Boom:
    """Unpickling this creates a marker directory: proof that the loader ran the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_checkpoint_refused_never_unpickled(zoo, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(zoo / "a", evil)
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Boom(str(marker)), f)
    with pytest.raises(EvoError, match=r"pytorch_model\.bin: pickle checkpoints are refused"):
        merge_to_dir(_ties(a="evil"), tmp_path / "o", resolve=lambda n: zoo / n if n != "evil" else evil)
    assert not marker.exists()
    assert _no_leftovers(tmp_path, "o")


def test_nan_in_source_tensor(zoo, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(zoo / "a", bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(EvoError, match=r"tensor model\.layers\.1\.self_attn\.q_proj\.weight contains NaN"):
        merge_to_dir(_ties(a="nan"), tmp_path / "o", resolve=lambda n: zoo / n if n != "nan" else bad)
    assert _no_leftovers(tmp_path, "o")


def test_existing_output_refused(zoo, tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(EvoError, match="already exists"):
        merge_to_dir(_ties(), tmp_path / "o", resolve=lambda n: zoo / n)


@pytest.mark.parametrize("text, message", [("merge_method: nope\nmodels: [{model: a}]\n", "unknown merge_method"),
                                           (TIES_YAML.replace("density: 0.5", "densty: 0.5"),
                                            "unknown parameter 'densty'")])
def test_bad_recipe_fails_before_any_output(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(EvoError, match=message):
        merge_to_dir(MergeConfig.from_yaml(tmp_path / "r.yaml"), tmp_path / "o")
    assert _no_leftovers(tmp_path, "o")


def test_error_midway_leaves_nothing(zoo, tmp_path, monkeypatch):
    import evo.merge.io as mio

    def fail(*a, **k):
        raise EvoError("disk full (simulated)")
    monkeypatch.setattr(mio.shutil, "copyfile", fail)
    with pytest.raises(EvoError, match="simulated"):
        merge_to_dir(_ties(), tmp_path / "o", resolve=lambda n: zoo / n)
    assert _no_leftovers(tmp_path, "o")


def test_streaming_reads_bfloat16_and_sharded_sources(zoo, tmp_path):
    """Sources stored as bf16 and as a sharded checkpoint merge like the float32 originals would."""
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(zoo / "a")
    src.to(torch.bfloat16).save_pretrained(tmp_path / "a_bf16", max_shard_size="4KB")
    assert (tmp_path / "a_bf16" / "model.safetensors.index.json").is_file()
    cfg = _ties(a="a_bf16")
    out = merge_to_dir(cfg, tmp_path / "o", resolve=lambda n: zoo / n if n != "a_bf16" else tmp_path / "a_bf16")
    got = load_file(str(out / "model.safetensors"))
    base, _ = load_model_dir(zoo / "base")
    a16 = {n: t.float() for n, t in load_model_dir(tmp_path / "a_bf16")[0].items()}
    expected = Merger(base, task_vectors(base, {"a_bf16": a16}), num_layers=2).merge(cfg)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name


@pytest.mark.parametrize("damage", ["truncate", "header", "array"])
def test_corrupt_safetensors_is_one_line_error(zoo, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(zoo / "a", bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    if damage == "array":  # valid JSON, not a header object
        f.write_bytes((8).to_bytes(8, "little") + b"[1, 2]  ")
    else:
        f.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(EvoError) as exc:
        merge_to_dir(_ties(a="bad"), tmp_path / "o", resolve=lambda n: zoo / n if n != "bad" else bad)
    msg = str(exc.value)
    assert "\n" not in msg and str(f) in msg and "cannot read safetensors" in msg
    assert _no_leftovers(tmp_path, "o")


def test_safetensors_writer_round_trips_through_the_library(tmp_path):
    from evo.merge.safetensors_io import SafetensorsFile, SafetensorsWriter

    sd = {"w": torch.randn(3, 5), "h": torch.randn(4).to(torch.bfloat16), "i": torch.arange(6), "e": torch.zeros(0, 2)}
    with SafetensorsWriter(tmp_path / "x.safetensors", [(n, t.dtype, t.shape) for n, t in sd.items()],
                           {"format": "pt"}) as w:
        for n, t in sd.items():
            w.write(n, t)
    back = load_file(str(tmp_path / "x.safetensors"))  # the reference reader
    assert set(back) == set(sd) and all(torch.equal(back[n], t) and back[n].dtype == t.dtype for n, t in sd.items())
    view = SafetensorsFile(tmp_path / "x.safetensors")
    assert all(torch.equal(view.tensor(n), t) for n, t in sd.items())
    with pytest.raises(RuntimeError, match="expected tensor w, got h"):
        with SafetensorsWriter(tmp_path / "y.safetensors", [("w", torch.float32, (3, 5)), ("h", torch.float32, (4,))]) as w:
            w.write("h", torch.zeros(4))
