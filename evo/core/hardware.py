"""What this machine's CPU can do that changes evo's defaults (detected, never assumed)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# /proc/cpuinfo flag -> name, best first: native bfloat16 matrix and vector instructions
BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is absent or unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> str | None:
    """The best native bf16 instruction set of this CPU ("AMX-BF16", "AVX512-BF16"), or None."""
    flags = cpu_flags() if flags is None else flags
    return next((name for flag, name in BF16_FLAGS.items() if flag in flags), None)


def dtype_reason(*, gpu: bool, flags: frozenset[str] | None = None) -> str:
    """Why ``dtype: auto`` gives what it gives here (the memory plan prints it)."""
    if gpu:
        return "auto: bfloat16 on GPUs (tensor cores; half the memory)"
    bf16 = native_bf16(flags)
    if bf16 is None:
        return ("auto: float32 on this CPU (no AVX512-BF16 or AMX-BF16: bf16 matrix products would be emulated, "
                "slower than float32)")
    return (f"auto: float32 on CPUs for now; this CPU has {bf16}, where bench_runner measured dtype: bfloat16 at "
            "2.5x the candidates per minute for a mean 0.005-nat change (docs/bench.md): set it to use it")
