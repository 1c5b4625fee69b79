"""Shared fixtures: a micro model zoo built once per test session, from stdlib-only text."""
from __future__ import annotations

import os

# Ray phones home on start-up unless told not to; tests must not reach the network.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

MICRO_DOMAINS = ("code", "c", "doc")


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """The ``micro`` zoo on ``code``, ``c`` and ``doc`` (no extra packages), about 10 s on 2
    cores: base + three specialists (~45k parameters each), data splits and zoo.json."""
    from evo.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "micro", domains=MICRO_DOMAINS, size="micro",
                     seed=0, progress=False)
