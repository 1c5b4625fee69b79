"""Shared fixtures: a micro model zoo built once per test session, from stdlib-only text."""
from __future__ import annotations

import os

# Ray phones home on start-up unless told not to; tests must not reach the network.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Inductor compiles the fused merge kernel in its own thread rather than a pool of compile
# subprocesses: on a loaded 2-core machine the pool's start-up is the slow, fragile part
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

MICRO_DOMAINS = ("code", "c", "doc")
HANG = 600  # seconds: only a hung command or run gets this far; the limit turns a hang into a failure


# ---------------------------------------------------------------------- the `evo` command, as a user runs it
def evo_env(**extra) -> dict:
    """This process's environment without ``RAY_ADDRESS`` (a child driver starts or joins the Ray
    its config names, never one the variable points at), plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **extra}


def run_evo(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``python -m evo.cli ARGS`` in a child process, to its end; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "evo.cli", *map(str, args)], capture_output=True, text=True,
                          env=evo_env() if env is None else env, timeout=HANG, **kw)


def start_evo(*args, env: dict | None = None, **popen) -> subprocess.Popen:
    """``python -m evo.cli ARGS`` started in a child process (``popen``: its pipes, ``text``, ``cwd``);
    the test waits on its events and ends it."""
    return subprocess.Popen([sys.executable, "-m", "evo.cli", *map(str, args)], env=evo_env() if env is None else env,
                            **popen)


# ---------------------------------------------------------------------- waiting on events, never on a clock
def wait_for(event, child: subprocess.Popen | None = None, *, timeout: float = HANG, poll_s: float = 0.02) -> bool:
    """Poll ``event()`` (a file appearing, a line in a log, a process state) until it holds: True.
    False once ``child`` has exited without it (asked once more after the exit) or at ``timeout``,
    which only a hung run reaches. ``poll_s`` paces the polling; nothing waits for a duration."""
    deadline = time.monotonic() + timeout
    while child is None or child.poll() is None:
        if event():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return bool(event())


def expect(event, child: subprocess.Popen, what: str, **kw) -> None:
    """:func:`wait_for`, failing the test when the event never comes: with the end of the child's
    stderr if it exited, else as a timeout."""
    if wait_for(event, child, **kw):
        return
    if child.poll() is None:
        pytest.fail(f"timed out waiting for {what}")
    err = child.stderr.read() if child.stderr else ""
    pytest.fail(f"{what}: the child exited ({child.returncode}) first: "
                + (err.decode() if isinstance(err, bytes) else err)[-2000:])


def read_until(stream, match) -> list[str]:
    """Lines of a child's text ``stream`` up to and including the first that ``match(line)``
    accepts (every line, should the stream end first): a wait on a line the child prints."""
    seen = []
    for line in stream:
        seen.append(line)
        if match(line):
            break
    return seen


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """The ``micro`` zoo on ``code``, ``c`` and ``doc`` (no extra packages), about 10 s on 2
    cores: base + three specialists (~45k parameters each), data splits and zoo.json."""
    from evo.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "micro", domains=MICRO_DOMAINS, size="micro",
                     seed=0, progress=False)


@pytest.fixture(scope="session")
def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One real local Ray for the whole session (start-up costs seconds on 2 cores).

    ``address="local"`` never joins a cluster left behind by something else; fractional CPUs
    in the tests keep two evaluators from starving the driver; no dashboard unless a test asks.
    """
    import ray

    from evo.cluster.bootstrap import normal_priority_workers

    with normal_priority_workers():  # as evo's own embedded Ray: evaluators are not starved on a busy machine
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 * 1024**2,
            log_to_driver=False,
            configure_logging=False,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
        )
    yield ray
    ray.shutdown()


def write_layerwise_space(folder, repo_root, groups: int = 2):
    """The shipped task-arithmetic layer-wise space with fewer layer groups (micro models)."""
    import yaml

    data = yaml.safe_load((repo_root / "search_spaces" / "task_arithmetic_layerwise.yaml").read_text())
    data["layer_groups"] = groups
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def space_file(tmp_path, repo_root):
    """A 2-group layer-wise space (a test module may define its own ``space_file``)."""
    return write_layerwise_space(tmp_path, repo_root)


def write_llama(path, seed, **overrides):
    """A micro Llama (hidden 16, 2 layers, vocabulary 64) saved to ``path``, every tensor moved off its init."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=64)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms start at 1: give every tensor a real delta
    model.save_pretrained(path)
    return path


def mergekit_yaml_tensors(config_path, out_dir) -> dict:
    """Run mergekit's own ``mergekit-yaml`` on ``config_path`` into ``out_dir`` and return every
    tensor it wrote (the parity oracle; skips where mergekit is not installed)."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file

    pytest.importorskip("mergekit", reason="mergekit is not installed (optional oracle)")
    exe = shutil.which("mergekit-yaml")
    if exe is None:
        pytest.skip("mergekit-yaml entry point not on PATH")
    subprocess.run([exe, str(config_path), str(out_dir), "--no-lazy-unpickle"], check=True, capture_output=True,
                   timeout=300)
    out = {}
    for f in sorted(Path(out_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
