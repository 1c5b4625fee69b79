"""Synthetic model families at real shapes, for scale benchmarks and memory tests.

No hub here, and training a 1B model is out of reach on a CPU, but memory and speed depend on
shapes, not on what the weights learned: a random Llama base and specialists that are the base
plus seeded low-rank and noise deltas (what fine-tunes look like to a merge) are written as
safetensors model directories that evo loads like any other.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from evo.core.tensors import DTYPES


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie: bool = True

    def config(self, dtype: str) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "num_hidden_layers": self.layers, "intermediate_size": self.intermediate,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": self.tie, "hidden_act": "silu", "torch_dtype": dtype,
                "bos_token_id": 1, "eos_token_id": 2}

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape, as transformers' Llama names them."""
        h, i, d = self.hidden, self.intermediate, self.hidden // self.heads
        out = {"model.embed_tokens.weight": (self.vocab, h), "model.norm.weight": (h,)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (self.kv_heads * d, h),
                        p + "self_attn.v_proj.weight": (self.kv_heads * d, h), p + "self_attn.o_proj.weight": (h, h),
                        p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                        p + "mlp.down_proj.weight": (h, i),
                        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        if not self.tie:
            out["lm_head.weight"] = (self.vocab, h)
        return out

    @property
    def params(self) -> int:
        total = 0
        for shape in self.tensors().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total


# SmolLM2-135M, SmolLM2-360M and TinyLlama-1.1B shapes
SHAPES = {
    "135M": LlamaShape(576, 30, 1536, 9, 3, 49152),
    "360M": LlamaShape(960, 32, 2560, 15, 5, 49152),
    "1.1B": LlamaShape(2048, 22, 5632, 32, 4, 32000, tie=False),
}


def write_family(out: str | Path, shape: LlamaShape, *, sources: int = 3, dtype: str = "bfloat16",
                 seed: int = 0, rank: int = 8, tokenizer: str | Path | None = None) -> tuple[Path, dict[str, Path]]:
    """A base and ``sources`` specialists under ``out`` (``base/``, ``s0/`` ...); returns their
    directories. Each specialist adds to every matrix a rank-``rank`` update and small noise, both
    seeded per (specialist, tensor). ``tokenizer``: a tokenizer directory copied next to each
    model (its vocabulary must not exceed the shape's). Written tensor by tensor in ``dtype``."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out)
    names = ["base", *[f"s{i}" for i in range(sources)]]
    dirs = {n: out / n for n in names}
    if all((d / "model.safetensors").is_file() for d in dirs.values()):
        return dirs["base"], {n: dirs[n] for n in names[1:]}
    store = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    base = {}
    for name, shp in shape.tensors().items():
        if len(shp) == 1:
            base[name] = torch.ones(shp, dtype=store)
        else:
            base[name] = (torch.randn(shp, generator=gen) * 0.02).to(store)
    for n in names:
        dirs[n].mkdir(parents=True, exist_ok=True)
        if n == "base":
            sd = base
        else:
            sd = {}
            for j, (name, t) in enumerate(base.items()):
                g = torch.Generator().manual_seed(seed * 1_000_003 + int(n[1:]) * 10_007 + j)
                if t.dim() == 2:
                    a = torch.randn(t.shape[0], rank, generator=g) * 0.01
                    b = torch.randn(rank, t.shape[1], generator=g) * 0.01
                    upd = a @ b + torch.randn(t.shape, generator=g) * 0.002
                else:
                    upd = torch.randn(t.shape, generator=g) * 0.01
                sd[name] = (t.float() + upd).to(store)
        save_file(sd, str(dirs[n] / "model.safetensors"), metadata={"format": "pt"})
        (dirs[n] / "config.json").write_text(json.dumps(shape.config(dtype), indent=1))
        if tokenizer is not None:
            for f in Path(tokenizer).iterdir():
                if f.is_file():
                    shutil.copy(f, dirs[n] / f.name)
        del sd
    return dirs["base"], {n: dirs[n] for n in names[1:]}
