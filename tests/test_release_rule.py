"""The continual loop's release rule on hand-made candidates: first release by weighted sum,
per-stratum retention guard, and the anchored guard that sums losses over releases."""
from __future__ import annotations

import pytest

from evo.loop.experiment import load_config
from evo.loop.release_rule import decide

PRIOR, V0 = "logppl/replay:prior", "logppl/replay:000-a"


@pytest.fixture
def make_cfg(micro_zoo, tmp_path, repo_root):
    (tmp_path / "stream").mkdir()

    def make(**release):
        return load_config({
            "zoo": str(micro_zoo.root), "search_space": str(repo_root / "search_spaces" / "merge_lora.yaml"), "stream": {"folder": str(tmp_path / "stream")},
            "release": {"tolerance": 0.05, **release}})
    return make


def cand(name, adaptation, **strata):
    metrics = {PRIOR: strata.get("prior", 4.0)}
    if "v0" in strata:
        metrics[V0] = strata["v0"]
    retention = sum(metrics.values()) / len(metrics)
    return {"candidate": name, "values": [adaptation, retention], "metrics": {"logppl/newest": adaptation, **metrics}}


def test_first_release_is_the_best_weighted_sum_if_it_beats_the_base(make_cfg):
    cfg = make_cfg(first="weighted")
    base = cand("base", 6.0, prior=4.0)
    pool = [cand("a", 5.0, prior=4.6), cand("b", 5.3, prior=4.1), cand("c", 5.9, prior=4.0)]
    d = decide(cfg, pool, base["values"], base["metrics"], first=True)
    assert d.release and d.candidate["candidate"] == "b"  # 5.3 + 4.1 is the lowest sum
    assert d.drift == {}  # nothing guarded yet: the first release is every stratum's anchor
    d = decide(cfg, [cand("x", 6.1, prior=4.0)], base["values"], base["metrics"], first=True)
    assert not d.release and "does not improve on the base's" in d.decision


def test_every_older_stratum_is_guarded_on_its_own(make_cfg):
    cfg = make_cfg(guard="current")
    ref = cand("release", 6.0, prior=4.0, v0=5.0)
    pool = [
        cand("forgets-v0", 4.0, prior=3.8, v0=5.06),    # the mean improves, one stratum loses 0.06
        cand("ok", 5.0, prior=4.04, v0=5.04),
        cand("better-ok", 4.8, prior=4.045, v0=4.9),     # just within the tolerance on the prior
    ]
    d = decide(cfg, pool, ref["values"], ref["metrics"], first=False)
    assert d.release and d.candidate["candidate"] == "better-ok"
    assert "within 0.05 of the current release's" in d.rule
    d = decide(cfg, pool[:1], ref["values"], ref["metrics"], first=False)
    assert not d.release and d.candidate is None and d.decision == "no candidate passed the retention guard"
    d = decide(make_cfg(guard="current", min_improvement=1.5), pool, ref["values"], ref["metrics"], first=False)
    assert not d.release and d.candidate["candidate"] == "better-ok" and "does not improve" in d.decision
    d = decide(make_cfg(guard="current", auto=False), pool, ref["values"], ref["metrics"], first=False)
    assert not d.release and d.decision == "rule met; release.auto is off"


def test_anchored_guard_sums_losses_so_small_steps_cannot_add_up(make_cfg):
    ref = cand("release", 6.0, prior=4.0, v0=5.0)
    step = cand("small-loss", 5.0, prior=4.03, v0=5.04)
    drift = {PRIOR: 0.03}  # an earlier release already gave up 0.03 on the prior
    # against the current release alone the step passes; against the anchor it is 0.06 > 0.05
    assert decide(make_cfg(guard="current"), [step], ref["values"], ref["metrics"], first=False, drift=drift).release
    d = decide(make_cfg(), [step], ref["values"], ref["metrics"], first=False, drift=drift)
    assert not d.release and "within 0.05 of its anchor" in d.rule
    # a candidate that wins some of the prior back ships, and the drift carries both strata
    # (the first version's stratum is new here: its anchor is the current release, drift 0)
    back = cand("wins-back", 5.2, prior=3.99, v0=5.05)
    d = decide(make_cfg(), [step, back], ref["values"], ref["metrics"], first=False, drift=drift)
    assert d.release and d.candidate["candidate"] == "wins-back"
    assert d.drift == pytest.approx({PRIOR: 0.02, V0: 0.05})
    # an improvement is banked: the next release may spend it, no more
    d = decide(make_cfg(), [cand("spends", 5.0, prior=4.065, v0=5.0)], ref["values"], ref["metrics"], first=False,
               drift={PRIOR: -0.02, V0: 0.0})
    assert d.release and d.drift == pytest.approx({PRIOR: 0.045, V0: 0.0})
    assert not decide(make_cfg(), [cand("spends", 5.0, prior=4.075, v0=5.0)], ref["values"], ref["metrics"],
                      first=False, drift={PRIOR: -0.02, V0: 0.0}).release


def test_release_guard_must_be_known(make_cfg):
    from evo.core.errors import EvoError

    with pytest.raises(EvoError, match=r"release.guard: must be 'anchored' or 'current', got 'latest'"):
        make_cfg(guard="latest")


def test_first_release_is_guarded_against_the_base_by_default(make_cfg):
    """``release.first: guarded``: the best adaptation whose every prior stratum is within the
    tolerance of the base (the base is their anchor), and the drift starts counting there."""
    cfg = make_cfg()
    base = cand("base", 6.0, prior=4.0)
    pool = [cand("adapts-most", 4.8, prior=4.2), cand("within", 5.0, prior=4.04), cand("c", 5.9, prior=3.9)]
    d = decide(cfg, pool, base["values"], base["metrics"], first=True)
    assert d.release and d.candidate["candidate"] == "within"  # adapts-most forgets 0.2 nats of the prior
    assert d.drift == {PRIOR: pytest.approx(0.04)}
    d = decide(cfg, [cand("forgets", 4.0, prior=4.3)], base["values"], base["metrics"], first=True)
    assert not d.release and d.decision == "no candidate passed the retention guard"
