"""Experiment config: paths resolve, and every mistake is one line naming file and field."""
import pytest
import yaml

from evo.loop.experiment import load_config
from evo.core.errors import EvoError


@pytest.fixture
def layout(tmp_path):
    (tmp_path / "m" / "base").mkdir(parents=True)
    (tmp_path / "m" / "a").mkdir()
    (tmp_path / "valid.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "space.yaml").write_text("merge_method: ties\ngenes: {w: {type: float, low: 0, high: 1}}\n")
    return tmp_path


def good(**over):
    data = {
        "search_space": "space.yaml",
        "models": {"base": "m/base", "sources": {"a": "m/a"}},
        "eval": {"sets": {"x": "valid.jsonl"}},
        "optimizer": {"name": "ga", "generations": 2, "population": 4},
    }
    data.update(over)
    return data


def write(layout, data):
    path = layout / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_relative_paths_resolve_against_the_config_file(layout, monkeypatch):
    monkeypatch.chdir("/")
    cfg = load_config(write(layout, good()))
    assert cfg.models.base == str(layout / "m" / "base")
    assert cfg.eval.sets == {"x": str(layout / "valid.jsonl")}
    assert cfg.objectives[0].name == "mean_logppl" and cfg.objectives[0].goal == "minimize"
    assert load_config(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"optimizer": {"population": "many"}}, "optimizer.population: expected int, got 'many'"),
        ({"optimizer": {"popsize": 3}}, "optimizer.popsize: unknown field"),
        ({"optimizer": {"start": "centre"}}, "optimizer.start: must be uniform or best_lambda, got 'centre'"),
        ({"ray": {"evaluators": 0}}, "ray.evaluators: must be >= 1"),
        ({"search_space": "nope.yaml"}, "search_space: file not found"),
        ({"models": {"base": "m/base", "sources": {"a": "m/zzz"}}}, "models.sources.a: model directory not found"),
        ({"eval": {"sets": {"x": "missing.jsonl"}}}, "eval.sets.x: file not found"),
        ({"objectives": [{"name": "o", "goal": "lower"}]}, "objectives[0].goal"),
        ({"objectives": [{"name": "o", "sets": ["y"]}]}, "objectives[0].sets: unknown evaluation set 'y'"),
        ({"objectives": [{"name": "o"}, {"name": "o"}]}, "objectives[1].name: duplicate"),
        ({"objectives": [{"goal": "minimize"}]}, "objectives[0]"),
        ({"seeed": 1}, "seeed: unknown field"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_field(layout, over, needle):
    path = write(layout, good(**over))
    with pytest.raises(EvoError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(EvoError, match="experiment config not found"):
        load_config(tmp_path / "none.yaml")
