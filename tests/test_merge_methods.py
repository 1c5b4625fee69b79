"""Merge math on tensors small enough to check by hand."""

import pytest
import torch

from evo.core.errors import EvoError
from evo.merge import Merger, MergeConfig, task_vectors


def _cfg(method, models, base="base", **params):
    d = {"merge_method": method, "models": models, "parameters": params}
    if base is not None:
        d["base_model"] = base
    return MergeConfig.from_dict(d)


def _merger(base, models, num_layers=1):
    base = {k: torch.tensor(v, dtype=torch.float32) for k, v in base.items()}
    models = {m: {k: torch.tensor(v, dtype=torch.float32) for k, v in sd.items()} for m, sd in models.items()}
    return Merger(base, task_vectors(base, models), num_layers=num_layers)


def test_linear_weighted_mean_and_unnormalized_sum():
    m = _merger({"w": [1.0, 2.0]}, {"a": {"w": [3.0, 2.0]}, "b": {"w": [0.0, 6.0]}})
    out = m.merge(_cfg("linear", [{"model": "a", "parameters": {"weight": 1}},
                                  {"model": "b", "parameters": {"weight": 3}}], base=None))
    assert torch.allclose(out["w"], torch.tensor([0.75, 5.0]))
    out = m.merge(_cfg("linear", [{"model": "a", "parameters": {"weight": 1}},
                                  {"model": "b", "parameters": {"weight": 3}}], base=None, normalize=False))
    assert torch.allclose(out["w"], torch.tensor([3.0, 20.0]))


def test_linear_entry_naming_the_base_uses_base_weights():
    m = _merger({"w": [1.0]}, {"a": {"w": [3.0]}})
    out = m.merge(_cfg("linear", [{"model": "base", "parameters": {"weight": 1}},
                                  {"model": "a", "parameters": {"weight": 1}}]))
    assert out["w"].item() == pytest.approx(2.0)


def test_task_arithmetic_lambda_and_normalize():
    m = _merger({"w": [1.0, 1.0]}, {"a": {"w": [2.0, 0.0]}, "b": {"w": [1.0, 3.0]}})
    models = [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 0.5}}]
    # deltas a = [1, -1], b = [0, 2]
    out = m.merge(_cfg("task_arithmetic", models, **{"lambda": 2.0}))
    assert torch.allclose(out["w"], torch.tensor([1 + 2 * 1.0, 1 + 2 * (-1 + 1.0)]))
    out = m.merge(_cfg("task_arithmetic", models, normalize=True))
    assert torch.allclose(out["w"], torch.tensor([1 + 1 / 1.5, 1 + 0.0]))


TIES_DELTAS = {"a": [3.0, -1.0, 2.0, 0.5], "b": [-2.0, -4.0, 1.0, 0.1], "c": [1.0, 2.0, -5.0, 0.2]}


def _ties_merger():
    return _merger({"w": [0.0] * 4}, {m: {"w": v} for m, v in TIES_DELTAS.items()})


def test_ties_by_hand_equal_weights():
    # density 0.5 keeps 2 of 4: a -> [3,0,2,0], b -> [-2,-4,0,0], c -> [0,2,-5,0]
    # sign of the sum: [+,-,-,+]; agreeing entries averaged; an all-zero column stays 0
    models = [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in TIES_DELTAS]
    out = _ties_merger().merge(_cfg("ties", models))
    assert out["w"].tolist() == [3.0, -4.0, -5.0, 0.0]


def test_ties_weights_vote_and_divide():
    # weighted: a [3,0,2,0], b [-4,-8,0,0], c [0,2,-5,0]; majority [-,-,-,+]
    models = [{"model": m, "parameters": {"weight": w, "density": 0.5}} for m, w in zip(TIES_DELTAS, [1, 2, 1])]
    m = _ties_merger()
    assert m.merge(_cfg("ties", models))["w"].tolist() == [-2.0, -4.0, -5.0, 0.0]
    assert m.merge(_cfg("ties", models, normalize=False))["w"].tolist() == [-4.0, -8.0, -5.0, 0.0]


def test_ties_negative_weight_flips_vote():
    m = _merger({"w": [0.0]}, {"a": {"w": [1.0]}, "b": {"w": [1.0]}})
    models = [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": -2.0}}]
    # weighted deltas 1 and -2: majority -, only b agrees; divisor is its weight -2
    assert m.merge(_cfg("ties", models))["w"].tolist() == [1.0]  # -2 / -2
    assert m.merge(_cfg("ties", models, normalize=False))["w"].tolist() == [-2.0]


def test_ties_density_zero_and_one():
    models = [{"model": m, "parameters": {"weight": 1.0, "density": 0.0}} for m in TIES_DELTAS]
    assert _ties_merger().merge(_cfg("ties", models))["w"].tolist() == [0.0] * 4
    models = [{"model": m, "parameters": {"weight": 1.0}} for m in TIES_DELTAS]
    # density 1: sums [2,-3,-2,0.8] give signs [+,-,-,+]; column 1 averages -1 and -4
    out = _ties_merger().merge(_cfg("ties", models))["w"]
    assert torch.allclose(out, torch.tensor([2.0, -2.5, -5.0, 0.8 / 3]))


def test_per_layer_gradient_and_non_layer_tensors():
    names = ["model.layers.0.w", "model.layers.1.w", "model.layers.2.w", "model.embed_tokens.weight"]
    m = _merger({n: [0.0] for n in names}, {"a": {n: [1.0] for n in names}}, num_layers=3)
    out = m.merge(_cfg("task_arithmetic", [{"model": "a", "parameters": {"weight": [0.0, 1.0]}}]))
    assert [out[n].item() for n in names] == pytest.approx([0.0, 0.5, 1.0, 0.0])
    out = m.merge(_cfg("task_arithmetic", [{"model": "a", "parameters": {"weight": [1.0, 3.0, 2.0]}}]))
    assert [out[n].item() for n in names] == pytest.approx([1.0, 3.0, 2.0, 1.0])


def test_filters_first_match_wins_and_global_default():
    names = ["layers.0.mlp.up.weight", "layers.0.self_attn.q.weight", "norm.weight"]
    m = _merger({n: [0.0] for n in names}, {"a": {n: [1.0] for n in names}}, num_layers=1)
    weight = [{"filter": "mlp", "value": 2.0}, {"filter": "attn", "value": [3.0, 5.0]}]
    out = m.merge(_cfg("task_arithmetic", [{"model": "a", "parameters": {"weight": weight}}], weight=0.25))
    # single-layer model: t = 1 for layer tensors (mergekit), so the gradient gives 5
    assert [out[n].item() for n in names] == pytest.approx([2.0, 5.0, 0.25])


def test_outputs_are_reused_and_sources_untouched():
    base = {"w": torch.randn(64, 8)}
    a = {"w": torch.randn(64, 8)}
    deltas = task_vectors(base, {"a": a})
    snapshot = deltas["a"]["w"].clone(), base["w"].clone()
    m = Merger(base, deltas, num_layers=1)
    first = m.merge(_cfg("ties", [{"model": "a", "parameters": {"weight": 1.0, "density": 0.3}}]))
    buf = first["w"]
    second = m.merge(_cfg("task_arithmetic", [{"model": "a", "parameters": {"weight": 0.5}}]))
    assert second["w"] is buf
    assert torch.equal(deltas["a"]["w"], snapshot[0]) and torch.equal(base["w"], snapshot[1])
    assert torch.allclose(buf, base["w"] + 0.5 * (a["w"] - base["w"]))


def test_out_buffers_in_other_dtype_and_skipped_names():
    base = {"w": torch.ones(4)}
    out = {"w": torch.zeros(4, dtype=torch.bfloat16), "lm_head.weight": torch.full((2,), 7.0)}
    m = Merger(base, task_vectors(base, {"a": {"w": torch.full((4,), 3.0)}}), num_layers=1, out=out)
    res = m.merge(_cfg("task_arithmetic", [{"model": "a", "parameters": {"weight": 1.0}}]))
    assert res["w"] is out["w"] and out["w"].tolist() == [3.0] * 4
    assert out["lm_head.weight"].tolist() == [7.0, 7.0]


def test_task_vectors_refuse_shape_and_name_mismatch():
    base = {"a.weight": torch.zeros(2, 3)}
    with pytest.raises(EvoError, match=r"model 'm'.*a\.weight.*shape"):
        task_vectors(base, {"m": {"a.weight": torch.zeros(3, 3)}})
    with pytest.raises(EvoError, match=r"model 'm'.*a\.weight.*missing"):
        task_vectors(base, {"m": {"b.weight": torch.zeros(2, 3)}})


def test_unknown_model_in_config():
    m = _merger({"w": [0.0]}, {"a": {"w": [1.0]}})
    with pytest.raises(EvoError, match="'zz' is not loaded"):
        m.merge(_cfg("task_arithmetic", [{"model": "zz", "parameters": {"weight": 1.0}}]))


def test_missing_required_weight_names_parameter_and_model():
    m = _merger({"w": [0.0]}, {"a": {"w": [1.0]}})
    with pytest.raises(EvoError, match="'weight' is required.*|model 'a'.*weight"):
        m.merge(_cfg("ties", [{"model": "a"}]))


def test_linear_named_base_is_an_input_like_mergekit():
    m = _merger({"w": [1.0]}, {"a": {"w": [3.0]}})
    cfg = _cfg("linear", [{"model": "a", "parameters": {"weight": 3.0}}], base="base", weight=1.0)
    assert m.merge(cfg)["w"].item() == pytest.approx((1.0 + 9.0) / 4)
    with pytest.raises(EvoError, match="'weight' is required"):
        m.merge(_cfg("linear", [{"model": "a", "parameters": {"weight": 3.0}}], base="base"))


def test_magnitude_table_is_exact_with_ties_and_any_rank():
    from evo.merge.sparsify import MagnitudeTable

    g = torch.Generator().manual_seed(1)
    d = torch.randn(50_000, generator=g)
    d[::7] = d[3]  # a large tie group
    d[::11] = -d[5]
    table = MagnitudeTable(d, q=256)
    a = d.abs()
    for k in [1, 2, 7, 195, 196, 197, 7143, 25_000, int(100 / 256 * 50_000), 49_999, 50_000]:
        assert table.kth_largest(k, d) == a.kthvalue(a.numel() - k + 1).values.item(), k


@pytest.mark.parametrize("method,extra", [
    ("task_arithmetic", {}),
    ("ties", {"density": 1234 / 4096}),     # on the table's grid: a lookup
    ("ties", {"density": 0.37}),            # off the grid: one band pass
    ("dare_ties", {"density": 0.5}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("della_linear", {"density": 0.6, "epsilon": 0.2}),
])
def test_resident_merger_matches_the_one_off_merge(method, extra):
    """Magnitude tables and the fused consensus kernel (evaluators) change speed, not tensors."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.mlp.up_proj.weight": (96, 64), "model.layers.1.self_attn.q_proj.weight": (64, 64),
              "model.norm.weight": (64,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    deltas = {m: {n: torch.randn(s, generator=g) * 0.1 for n, s in shapes.items()} for m in "abc"}
    cfg = MergeConfig.from_dict({
        "merge_method": method, "base_model": "base", "parameters": {},
        "models": [{"model": m, "parameters": {"weight": w, **extra}} for m, w in zip("abc", (0.5, 0.8, 0.3))],
    })
    one_off = {k: v.clone() for k, v in Merger(base, deltas, num_layers=2).merge(cfg, seed=3).items()}
    resident = Merger(base, deltas, num_layers=2, resident=True, fused=True)  # tiny: fused only when asked
    for _ in range(2):  # the second merge reuses the tables and the compiled kernel
        out = resident.merge(cfg, seed=3)
        for name in shapes:
            torch.testing.assert_close(out[name], one_off[name], rtol=1e-6, atol=1e-6)
    if method.startswith("della"):  # each source's per-row ranks were sorted once, not per merge
        assert len([k for k in resident._cache if k[1] == "della-ranks"]) == 3 * len(shapes)
    import shutil

    if any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        assert resident.fused.enabled, \
            f"the fused kernel fell back to eager although a C++ compiler is present: {resident.fused.reason}"
        if method == "task_arithmetic":  # a plain weighted sum stays eager: no compile to pay for
            assert resident.fused.calls == {"consensus": 0, "sum": 0}
        else:
            kernel = "sum" if method in ("breadcrumbs", "della_linear") else "consensus"
            assert resident.fused.calls[kernel] == 2 * len(shapes)  # every tensor, both merges, in one pass


def test_fused_kernel_is_compiled_only_where_it_pays(monkeypatch):
    """A small model's resident merger stays eager (its compile would outlast the search);
    EVO_FUSED forces either way."""
    from evo.merge.fused import FUSED_MIN_ENTRIES, fused_by_default

    monkeypatch.delenv("EVO_FUSED", raising=False)
    assert not fused_by_default(FUSED_MIN_ENTRIES - 1) and fused_by_default(FUSED_MIN_ENTRIES)
    base = {"model.norm.weight": torch.ones(64)}
    deltas = {m: {"model.norm.weight": torch.full((64,), v)} for m, v in (("a", 0.5), ("b", -0.2))}
    cfg = MergeConfig.from_dict({"merge_method": "ties", "base_model": "base", "parameters": {},
                                 "models": [{"model": m, "parameters": {"weight": 1.0, "density": 1.0}} for m in "ab"]})
    small = Merger(base, deltas, num_layers=1, resident=True)
    assert not small.fused.enabled
    out = small.merge(cfg)["model.norm.weight"]
    assert small.fused.calls == {"consensus": 0, "sum": 0}
    torch.testing.assert_close(out, torch.full((64,), 1.5))  # sign election keeps a's +0.5 only
    monkeypatch.setenv("EVO_FUSED", "1")
    assert fused_by_default(10) and Merger(base, deltas, num_layers=1, resident=True).fused.enabled
    monkeypatch.setenv("EVO_FUSED", "0")
    assert not fused_by_default(FUSED_MIN_ENTRIES * 10)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_resident_merger_matches_at_tiny_densities(method):
    """int(density·n) = 0: magnitude pruning still keeps the largest entry, breadcrumbs keeps none."""
    g = torch.Generator().manual_seed(1)
    base = {"model.norm.weight": torch.randn(64, generator=g)}
    deltas = {m: {"model.norm.weight": torch.randn(64, generator=g)} for m in "ab"}
    cfg = MergeConfig.from_dict({"merge_method": method, "base_model": "base",
                                 "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.01}} for m in "ab"]})
    one_off = Merger(base, deltas, num_layers=1).merge(cfg)["model.norm.weight"].clone()
    resident = Merger(base, deltas, num_layers=1, resident=True).merge(cfg)["model.norm.weight"]
    torch.testing.assert_close(resident, one_off, rtol=1e-6, atol=1e-6)
    assert (one_off != base["model.norm.weight"]).any() == (method == "ties")


@pytest.mark.parametrize("method,fused", [("ties", False), ("ties", True), ("task_arithmetic", False),
                                          ("dare_ties", True)],
                         ids=["ties-eager", "ties-fused", "task_arithmetic", "dare_ties-fused"])
def test_low_precision_sources_merge_in_float32_and_round_once(method, fused):
    """bf16-stored base and task vectors are read into float32 per tensor (widened copies on the
    eager path; inside the compiled kernel, or by type promotion for plain task arithmetic, with
    no copies): the bf16 result equals the float32 merge rounded once, except where rounding δ
    to bf16 moved it by one bf16 step."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.mlp.up_proj.weight": (96, 64), "model.norm.weight": (64,)}
    base = {n: torch.randn(s, generator=g).bfloat16() for n, s in shapes.items()}
    d32 = {m: {n: (base[n].float() + torch.randn(s, generator=g) * 0.01).bfloat16().float() - base[n].float()
               for n, s in shapes.items()} for m in "ab"}
    density = {} if method == "task_arithmetic" else {"density": 0.5}
    cfg = MergeConfig.from_dict({"merge_method": method, "base_model": "base", "parameters": {},
                                 "models": [{"model": m, "parameters": {"weight": w, **density}}
                                            for m, w in zip("ab", (0.6, 0.9))]})
    kw = {"resident": True, "fused": True} if fused else {}
    ref = Merger({n: t.float() for n, t in base.items()}, d32, num_layers=1, **kw).merge(cfg, seed=1)
    out = {n: torch.empty(s, dtype=torch.bfloat16) for n, s in shapes.items()}
    merger = Merger(base, {m: {n: t.bfloat16() for n, t in d.items()} for m, d in d32.items()},
                    num_layers=1, out=out, **kw)
    got = merger.merge(cfg, seed=1)
    if fused and merger.fused.enabled:  # the compiled kernel took the 16-bit inputs: no widened copies
        assert merger.fused.calls["consensus"] > 0
        assert not [k for k, _ in merger.scratch._bufs if k.startswith("widen")]
    if method == "task_arithmetic":
        assert not [k for k, _ in merger.scratch._bufs if k.startswith("widen")]
    for n in shapes:
        rounded = ref[n].bfloat16()
        assert got[n].dtype == torch.bfloat16
        assert (got[n] != rounded).float().mean() < 0.02  # rounding in bf16 throughout would differ far more
        # one bf16 step of the largest of the two and of the merged task vectors (rounding each δ
        # to bf16 moves its term by up to a step of δ, doubled by DARE's rescale at density 0.5)
        terms = sum(abs(w) * d32[m][n].abs() for m, w in zip("ab", (0.6, 0.9))) / 0.5
        step = torch.maximum(torch.maximum(got[n].float().abs(), rounded.float().abs()), terms) * 2.0 ** -7
        assert ((got[n].float() - rounded.float()).abs() <= torch.clamp_min(step, 1e-4)).all()
