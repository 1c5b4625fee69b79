"""One suite over every registered method, plus mergekit 0.1.5 as an oracle when installed."""

import pytest
import torch

from evo.merge import METHODS, MergeConfig, Merger, task_vectors
from evo.merge.sparsify import kth_largest

SHAPES = {"model.embed_tokens.weight": (40, 24), "model.layers.0.mlp.up_proj.weight": (48, 24),
          "model.layers.1.mlp.up_proj.weight": (48, 24), "model.layers.1.input_layernorm.weight": (24,)}
NAMES = ["m0", "m1", "m2"]


def _sources(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    models = {m: {n: base[n] + 0.3 * torch.randn(s, generator=g) for n, s in SHAPES.items()} for m in NAMES}
    return base, models


def _config(name, density=0.6, weights=(0.5, 0.3, 0.8), extra=None):
    method = METHODS[name]
    count = method.max_models or 3
    per_model = {p.name for p in method.params if p.per_model}
    models = []
    for m, w in list(zip(NAMES, weights))[:count]:
        params = {}
        if "weight" in per_model:
            params["weight"] = w
        if "density" in per_model:
            params["density"] = density
        models.append({"model": m, "parameters": params})
    d = {"merge_method": name, "models": models, "base_model": "base"}
    if name == "linear":
        d["models"] = [{"model": "base", "parameters": {"weight": 0.4}}] + models
    if name == "slerp":
        d["parameters"] = {"t": 0.3}
    if name == "model_stock":
        d["parameters"] = {"filter_wise": False}
    if name == "nearswap":
        d["parameters"] = {"t": 0.2}
    if name == "sce":
        d["parameters"] = {"select_topk": density}
    if name == "passthrough":  # one input in all: no base beside it
        d.pop("base_model")
        d["models"] = [{"model": "m1", "parameters": {"scale": 0.7}}]
    d.setdefault("parameters", {}).update(extra or {})
    return MergeConfig.from_dict(d)


@pytest.fixture(scope="module")
def merger():
    base, models = _sources()
    return Merger(base, task_vectors(base, models), num_layers=2), base, models


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_finite_reused_and_reproducible(merger, name):
    m, base, _ = merger
    cfg = _config(name)
    first = {n: t.clone() for n, t in m.merge(cfg, seed=1).items()}
    again = m.merge(cfg, seed=1)
    assert all(again[n] is m.out[n] for n in SHAPES)
    for n in SHAPES:
        assert torch.isfinite(again[n]).all()
        assert torch.equal(first[n], again[n]), f"{name} not reproducible on {n}"
    if METHODS[name].random:
        other = m.merge(cfg, seed=2)
        assert any(not torch.equal(first[n], other[n]) for n in SHAPES)


def test_random_mask_keeps_about_density_and_ignores_tensor_order():
    base = {"a": torch.zeros(200_000), "b": torch.zeros(10)}
    deltas = {"m": {"a": torch.ones(200_000), "b": torch.ones(10)}}
    cfg = MergeConfig.from_dict({"merge_method": "dare_linear", "base_model": "x", "parameters": {"rescale": False},
                                 "models": [{"model": "m", "parameters": {"weight": 1.0, "density": 0.3}}]})
    out = Merger(base, deltas, num_layers=1).merge(cfg, seed=5)["a"].clone()
    assert abs(out.mean().item() - 0.3) < 0.005
    reordered = Merger({"b": base["b"], "a": base["a"]}, {"m": {"b": deltas["m"]["b"], "a": deltas["m"]["a"]}},
                       num_layers=1).merge(cfg, seed=5)["a"]
    assert torch.equal(out, reordered)


def test_fast_threshold_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3_000_000, generator=g).abs()
    flags = torch.empty(6_000_000, dtype=torch.bool)
    for k in (1, 1000, 900_000, 2_999_000):
        assert kth_largest(x, k, flags) == x.kthvalue(x.numel() - k + 1).values.item()
    ties = torch.randint(0, 50, (200_000,), generator=g).float()  # heavy ties, sampled path
    for k in (1, 3_999, 4_000, 100_000, 200_000):
        assert kth_largest(ties, k, flags) == ties.kthvalue(ties.numel() - k + 1).values.item()


def _mergekit():
    try:
        from mergekit.merge_methods.api import merge_tensors
    except ImportError:
        pytest.skip("mergekit is not installed (optional oracle: pip install mergekit)")
    return merge_tensors


# Random sparsifiers cannot share mergekit's global-RNG draws; at density 1 they are deterministic.
ORACLE = [(n, 0.6) for n in ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties",
                             "slerp", "nuslerp", "model_stock", "sce", "nearswap", "multislerp", "karcher",
                             "passthrough", "ram", "ramplus_tl", "arcee_fusion")] + \
         [(n, 1.0) for n in ("dare_ties", "dare_linear", "della", "della_linear")]


OPTIONS = [("model_stock", 1.0, {"filter_wise": True}), ("nuslerp", 1.0, {"nuslerp_flatten": False}),
           ("nuslerp", 1.0, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
           ("ties", 0.4, {"rescale": True, "lambda": 1.3, "normalize": False}),
           ("breadcrumbs", 0.7, {"rescale": True, "gamma": 0.05}), ("task_arithmetic", 1.0, {"normalize": True}),
           ("linear", 1.0, {"normalize": False}), ("sce", 1.0, {}), ("sce", 0.1, {}),
           ("multislerp", 1.0, {"normalize_weights": False}), ("karcher", 1.0, {"max_iter": 3, "tol": 1e-3}),
           ("ram", 1.0, {"epsilon": 0.3}), ("ramplus_tl", 1.0, {"epsilon": 0.3, "r": 0.5, "alpha": 0.9})]


@pytest.mark.parametrize("name,density,extra", [(n, d, {}) for n, d in ORACLE] + OPTIONS)
def test_matches_mergekit(merger, name, density, extra):
    merge_tensors = _mergekit()
    m, base, models = merger
    cfg = _config(name, density=density, extra=extra)
    ours = m.merge(cfg)
    entries = [e for e in cfg.models if e.model != "base"]
    for n in SHAPES:
        tensors = [base[n]] + [models[e.model][n] for e in entries]
        params = {k: v for k, v in cfg.parameters.items()}
        for key in {k for e in entries for k in e.parameters}:
            params[key] = [e.parameters[key] for e in entries]
        if name == "linear":
            params["weight"] = [e.parameters["weight"] for e in cfg.models]
            ref = merge_tensors(tensors, "linear", parameters=params)
        elif cfg.base_model is None:  # passthrough: the one model is the only input
            ref = merge_tensors(tensors[1:], name, parameters=params)
        else:
            ref = merge_tensors(tensors, name, parameters=params, base_index=0)
        torch.testing.assert_close(ours[n], ref, rtol=1e-5, atol=1e-5, msg=f"{name} differs on {n}")


def test_dare_counter_hash_masks_are_independent_across_seeds_and_neighbours():
    from evo.merge.sparsify import random_prune

    x = torch.ones(400_000)
    masks = [random_prune(x, 0.5, torch.empty_like(x), seed=s) for s in (1, 2, 2**40 + 1)]
    for m in masks:
        assert abs(m.mean().item() - 0.5) < 0.005
        assert abs((m[:-1] * m[1:]).mean().item() - 0.25) < 0.005   # neighbours
        assert abs((m[:-2048] * m[2048:]).mean().item() - 0.25) < 0.005  # a row apart
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs((masks[i] * masks[j]).mean().item() - 0.25) < 0.005  # other seeds
    assert torch.equal(random_prune(x, 0.5, torch.empty_like(x), seed=1), masks[0])


@pytest.mark.parametrize("shape", [(64, 4096), (40_000,)], ids=["rows", "one-wide-row"])
def test_della_keep_probability_rises_with_magnitude_rank_within_each_row(shape):
    """density 0.5, ε 0.3: the smallest tenth of each row is kept at ~0.23, the largest at ~0.77
    (linear in rank); rows longer than 2^15 + 1 take the int64 path and obey the same rule."""
    from evo.merge.sparsify import della_prune, della_ranks

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    cols = shape[-1]
    kept = della_prune(x, 0.5, 0.3, torch.empty_like(x), seed=7) != 0
    ranks = della_ranks(x).reshape(shape).long()
    tenth = cols // 10
    expect = lambda lo, hi: 0.2 + 0.6 * (lo + hi - 1) / 2 / (cols - 1)  # noqa: E731 (mean p over ranks lo..hi-1)
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    assert abs(kept[ranks < tenth].float().mean().item() - expect(0, tenth)) < 0.015
    assert abs(kept[ranks >= cols - tenth].float().mean().item() - expect(cols - tenth, cols)) < 0.015
    again = della_prune(x, 0.5, 0.3, torch.empty_like(x), seed=7) != 0
    other = della_prune(x, 0.5, 0.3, torch.empty_like(x), seed=8) != 0
    # another seed draws independently: P(both) = E[p²] = 0.5² + 0.6²/12 for p uniform on [0.2, 0.8]
    assert torch.equal(kept, again) and abs((kept & other).float().mean().item() - 0.28) < 0.01
    # one-column rows have no spread: every entry at density − ε
    col = della_prune(torch.randn(20_000, 1), 0.5, 0.3, torch.empty(20_000, 1), seed=3) != 0
    assert abs(col.float().mean().item() - 0.2) < 0.015


@pytest.mark.parametrize("name", ["multislerp", "karcher"])
def test_spherical_means_without_a_base_match_mergekit(merger, name):
    """No base_model: multislerp averages the raw weights on the sphere, karcher every entry's."""
    merge_tensors = _mergekit()
    m, base, models = merger
    params = {"weight": [0.5, 0.3, 0.8]} if name == "multislerp" else {}
    cfg = MergeConfig.from_dict({"merge_method": name, "models": [
        {"model": n, "parameters": {"weight": w} if name == "multislerp" else {}}
        for n, w in zip(NAMES, (0.5, 0.3, 0.8))]})
    ours = m.merge(cfg)
    for n in SHAPES:
        ref = merge_tensors([models[k][n] for k in NAMES], name, parameters=params)
        torch.testing.assert_close(ours[n], ref, rtol=1e-5, atol=1e-5, msg=f"{name} differs on {n}")


def test_passthrough_refuses_a_base_and_nearswap_takes_one_model():
    from evo.core.errors import EvoError

    with pytest.raises(EvoError, match="passthrough.*no base_model"):
        MergeConfig.from_dict({"merge_method": "passthrough", "base_model": "base", "models": [{"model": "m0"}]})
    with pytest.raises(EvoError, match="nearswap' needs 1 models besides the base, got 2"):
        MergeConfig.from_dict({"merge_method": "nearswap", "base_model": "base", "parameters": {"t": 0.1},
                               "models": [{"model": "m0"}, {"model": "m1"}]})


def test_every_mergekit_method_is_registered():
    _mergekit()
    from mergekit.merge_methods.registry import registered_methods

    theirs = {m.spec.name for m in registered_methods()}
    assert len(theirs) == 20 and theirs == set(METHODS), sorted(theirs ^ set(METHODS))
