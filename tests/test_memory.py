"""The memory plan (``evo.cluster.memory``): read from headers before anything loads, printed, refused in
one line when it cannot fit, and close to what a real run's processes hold (PSS, measured from
outside the run on two model sizes)."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from conftest import run_evo, start_evo
from evo.loop.experiment import load_config
from evo.core.errors import EvoError
from evo.cluster.memory import GiB, PeakSampler, check_plan, plan_for
from evo.zoo.synthetic import LlamaShape, write_family

SMALL = LlamaShape(hidden=128, layers=2, intermediate=344, heads=4, kv_heads=2, vocab=2048)
LARGER = LlamaShape(hidden=768, layers=6, intermediate=2048, heads=12, kv_heads=4, vocab=16384)


def _config(family, zoo, space, *, dtype="float32", evaluators=1, **ray) -> dict:
    base, sources = family
    return {
        "models": {"base": str(base), "sources": {k: str(v) for k, v in sources.items()}},
        "search_space": str(space), "seed": 0, "dtype": dtype,
        "eval": {"sets": {d: str(zoo.data_dir(d, "valid")) for d in ("code", "doc")}, "tokenizer": str(zoo.tokenizer_dir),
                 "seq_len": 64, "max_blocks": 4, "batch_size": 4, "redraw": False, "test_blocks": 2,
                 "selection": {"fraction": 0.0, "lambdas": [0.5]}},
        "optimizer": {"name": "random", "generations": 1, "population": 3},
        "ray": {"evaluators": evaluators, "cpus_per_evaluator": 0.5, "dashboard": False, **ray},
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory, micro_zoo):
    return write_family(tmp_path_factory.mktemp("small"), SMALL, sources=3, dtype="float32",
                        tokenizer=micro_zoo.tokenizer_dir)


def test_plan_reads_headers_and_scales_with_dtype_and_evaluators(small, micro_zoo, space_file):
    one = plan_for(load_config(_config(small, micro_zoo, space_file)))
    shared = next(i.bytes for i in one.items if i.what.startswith("sources"))
    assert shared == 4 * SMALL.params * 4  # base + 3 task vectors, float32, once per node
    bf16 = plan_for(load_config(_config(small, micro_zoo, space_file, dtype="bfloat16")))
    assert next(i.bytes for i in bf16.items if i.what.startswith("sources")) == shared // 2
    model = next(i.bytes for i in bf16.items if "resident model" in i.what)
    assert model == SMALL.params * 2
    two = plan_for(load_config(_config(small, micro_zoo, space_file, evaluators=2)))
    per_eval = two.node_bytes - one.node_bytes
    assert per_eval > SMALL.params * 4  # a second evaluator adds its own model, scratch and runtime, not the sources
    assert "node total" in one.table() and one.problem() is None


def test_the_plan_says_which_dtype_auto_chose_and_why(small, micro_zoo, space_file, tmp_path, repo_root):
    from evo.core.hardware import dtype_reason, native_bf16

    assert native_bf16(frozenset({"fpu", "avx2"})) is None
    assert native_bf16(frozenset({"avx512_bf16", "amx_bf16"})) == "AMX-BF16"
    assert native_bf16(frozenset({"avx512_bf16"})) == "AVX512-BF16"
    assert "no AVX512-BF16 or AMX-BF16" in dtype_reason(gpu=False, flags=frozenset({"avx2"}))
    assert "this CPU has AVX512-BF16" in dtype_reason(gpu=False, flags=frozenset({"avx512_bf16"}))
    auto = plan_for(load_config(_config(small, micro_zoo, space_file, dtype="auto")))
    assert auto.notes[0] == f"dtype float32 ({dtype_reason(gpu=False)})"  # this machine's CPU, detected
    fixed = plan_for(load_config(_config(small, micro_zoo, space_file, dtype="bfloat16")))
    assert fixed.notes[0] == "dtype bfloat16 (as the config gives it)"
    # a data-flow space of single models' layers: each evaluator holds the base and every source whole
    flow = plan_for(load_config(_config(small, micro_zoo, repo_root / "search_spaces" / "dataflow_layers.yaml")))
    whole = next(i.bytes for i in flow.items if "source models whole" in i.what)
    assert whole == 4 * SMALL.params * 4 and any("data-flow paths" in n for n in flow.notes)


def test_a_run_that_cannot_fit_is_refused_in_one_line_before_ray_starts(small, micro_zoo, space_file, tmp_path, repo_root):
    cfg = _config(small, micro_zoo, space_file, evaluators=2, node_memory_gb=0.5)
    with pytest.raises(EvoError, match=r"memory plan: needs [\d.]+ GiB on this node, 0.5 GiB available; try ") as err:
        check_plan(load_config(cfg), plan_for(load_config(cfg)))
    assert "\n" not in str(err.value) and "ray.evaluators: 1" in str(err.value)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    done = run_evo("run", tmp_path / "exp.yaml", "--run-dir", tmp_path / "run", "--quiet", cwd=repo_root)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("evo: error: memory plan: needs") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "run").exists()  # nothing left for a rerun to refuse
    # `evo plan` shows the same plan and says why, with the exit code of a refusal
    shown = run_evo("plan", tmp_path / "exp.yaml", cwd=repo_root)
    assert shown.returncode == 2 and "node total" in shown.stdout and "does not fit" in shown.stdout
    cfg["ray"]["memory_check"] = False  # the escape hatch: the plan is an estimate
    check_plan(load_config(cfg), plan_for(load_config(cfg)))


@pytest.mark.parametrize("shape,dtype,evaluators", [(SMALL, "float32", 2), (LARGER, "bfloat16", 1)],
                         ids=["small-fp32-2", "larger-bf16-1"])
def test_plan_matches_the_measured_pss_of_a_real_run(shape, dtype, evaluators, micro_zoo, space_file, tmp_path,
                                                     repo_root):
    """A real ``evo run`` in a child process, its process tree's PSS sampled from here: the plan's
    node total is within 25 % of the measured peak, at two model sizes (runtime-dominated and
    weight-dominated)."""
    family = write_family(tmp_path / "family", shape, sources=3, dtype="bfloat16", tokenizer=micro_zoo.tokenizer_dir)
    cfg = _config(family, micro_zoo, space_file, dtype=dtype, evaluators=evaluators)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    plan = plan_for(load_config(cfg))
    child = start_evo("run", tmp_path / "exp.yaml", "--run-dir", tmp_path / "run", "--quiet", stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True, cwd=repo_root)
    sampler = PeakSampler(child.pid, period_s=0.2)
    _, err = child.communicate()
    sampler.stop()
    assert child.returncode == 0, err[-2000:]
    ratio = plan.node_bytes / sampler.peak
    assert 0.75 <= ratio <= 1.25, (f"plan {plan.node_bytes / GiB:.2f} GiB, measured peak PSS {sampler.peak / GiB:.2f} GiB\n"
                                   + plan.table())


def test_gpu_plan_keeps_sources_on_the_gpu_when_they_fit_else_streams_them(small, micro_zoo, space_file):
    """The placement logic, on CPU: sources on the GPU while they fit beside the model; a smaller
    GPU streams them per tensor from host memory (and says so); a GPU too small even for the
    model is refused."""
    cfg = load_config(_config(small, micro_zoo, space_file, evaluators=2, gpus_per_evaluator=0.5))
    roomy = plan_for(cfg, gpu_total=8 * GiB)
    assert not roomy.stream_sources and roomy.evaluators_per_gpu == 2
    assert any("sources on the GPU" in i.what for i in roomy.items) and "live on the GPU" in roomy.table()
    sources = 4 * SMALL.params * 4
    tight = plan_for(cfg, gpu_total=int((roomy.gpu_bytes - 2 * sources) / 0.9) + sources)
    assert tight.stream_sources and "stream to the GPU per tensor" in tight.table()
    assert tight.gpu_bytes < roomy.gpu_bytes and tight.problem() is None
    tiny = plan_for(cfg, gpu_total=1024)
    assert tiny.problem().startswith("needs") and "per GPU" in tiny.problem()


def test_streamed_sources_merge_exactly_as_resident_ones():
    """``stream_sources`` (a GPU too small for the sources) copies each tensor's inputs into reused
    buffers before merging; the result is bit-identical (checked on CPU, where the copy path runs too)."""
    import torch

    from evo.merge import MergeConfig, Merger

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.w": torch.randn(6, 5, generator=g).to(torch.bfloat16) for i in range(2)}
    deltas = {m: {n: (torch.randn(t.shape, generator=g) * 0.1).to(torch.bfloat16) for n, t in base.items()} for m in "ab"}
    for method, extra in (("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.7})):
        cfg = MergeConfig.from_dict({"merge_method": method, "base_model": "base",
                                     "models": [{"model": m, "parameters": {"weight": 0.8, **extra}} for m in "ab"]})
        want = {n: t.clone() for n, t in Merger(base, deltas, num_layers=2).merge(cfg, seed=3).items()}
        streamed = Merger(base, deltas, num_layers=2, stream_sources=True)
        got = streamed.merge(cfg, seed=3)
        assert all(torch.equal(got[n], want[n]) for n in want), method
        assert streamed.base["model.layers.0.w"] is base["model.layers.0.w"]  # left where it was, not copied
