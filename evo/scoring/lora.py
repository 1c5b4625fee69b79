"""A short LoRA adaptation of a (merged) causal LM on the newest data, with peft.

The evaluator keeps one resident model and merges each candidate into it; a LoRA fit wraps that
model in place, and :func:`unload` takes the LoRA layers out again without touching a base
weight (the very same tensors come back, so a merger holding references to them keeps working).
:func:`merged_state_dict` folds the adapter into plain weights for export without modifying the
resident model; :func:`save_adapter` writes the adapter alone as a PEFT directory.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evo.core.errors import EvoError
from evo.core.fs import staged_dir

# Named groups of Llama-style projection modules (the micro/tiny zoo, Llama, Mistral, Qwen).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "v_proj"),
    "attn_all": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LoraGenes:
    """What a recipe's ``lora`` section decodes to (``lora.*`` genes of a search space)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "attn"
    lr: float = 1e-3
    steps: int = 20
    batch_size: int = 8
    # share of each batch drawn from older data (rehearsal against forgetting); None: the
    # training data's own default (``stream.train_replay``); inert where there is no older data
    rehearsal: float | None = None

    @classmethod
    def from_dict(cls, data: dict, source: str = "lora") -> "LoraGenes":
        """Validate a recipe's ``lora`` mapping; every problem is a one-line EvoError."""
        if not isinstance(data, dict):
            raise EvoError(f"{source}: must be a mapping, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise EvoError(f"{source}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        kw = {**asdict(cls()), **data}
        out = {}
        for name, kind, ok, rule in (
            ("rank", int, lambda v: v >= 1, ">= 1"),
            ("alpha", float, lambda v: v > 0, "> 0"),
            ("dropout", float, lambda v: 0 <= v < 1, "in [0, 1)"),
            ("lr", float, lambda v: 0 < v < 1, "in (0, 1)"),
            ("steps", int, lambda v: v >= 1, ">= 1"),
            ("batch_size", int, lambda v: v >= 1, ">= 1"),
        ):
            out[name] = _number(kw[name], kind, f"{source}.{name}")
            if not ok(out[name]):
                raise EvoError(f"{source}.{name}: must be {rule}, got {kw[name]!r}")
        if kw["rehearsal"] is not None:
            out["rehearsal"] = _number(kw["rehearsal"], float, f"{source}.rehearsal")
            if not 0 <= out["rehearsal"] < 1:
                raise EvoError(f"{source}.rehearsal: must be in [0, 1), got {kw['rehearsal']!r}")
        target = kw["target_modules"]
        if target not in TARGET_PRESETS:
            raise EvoError(f"{source}.target_modules: unknown preset {target!r} (expected one of {', '.join(TARGET_PRESETS)})")
        return cls(target_modules=target, **out)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def modules(self) -> list[str]:
        return list(TARGET_PRESETS[self.target_modules])


def _number(value, kind, where):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise EvoError(f"{where}: must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise EvoError(f"{where}: must be finite, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise EvoError(f"{where}: must be an integer, got {value!r}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class TrainingData:
    """What a LoRA gene set trains on: the newest data and, optionally, older blocks to rehearse.

    ``newest`` and ``rehearsal`` are ``[n, seq_len]`` token blocks (numpy or torch; rehearsal
    blocks come from older training splits, never from held-out text). ``share`` is the share of
    each batch drawn from ``rehearsal`` for recipes whose genes do not set ``lora.rehearsal``.
    """

    newest: Any
    rehearsal: Any = None
    share: float = 0.0

    @classmethod
    def of(cls, data) -> "TrainingData":
        """``data`` as int64 torch blocks (a bare array is newest data, nothing to rehearse)."""
        if not isinstance(data, TrainingData):
            data = TrainingData(data)
        rehearsal = None if data.rehearsal is None or not len(data.rehearsal) else _blocks(data.rehearsal, "rehearsal")
        return cls(_blocks(data.newest, "train_blocks"), rehearsal, float(data.share))

    def __len__(self) -> int:
        return len(self.newest)


def _blocks(data, what: str) -> torch.Tensor:
    blocks = data if torch.is_tensor(data) else torch.from_numpy(np.ascontiguousarray(data))
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise EvoError(f"fit_lora: {what} must be [n >= 1, seq_len >= 2], got shape {tuple(blocks.shape)}")
    return blocks.long()


def lora_config(genes: LoraGenes):
    """The peft ``LoraConfig`` of ``genes``."""
    from peft import LoraConfig

    return LoraConfig(r=genes.rank, lora_alpha=genes.alpha, lora_dropout=genes.dropout,
                      target_modules=genes.modules, bias="none", task_type="CAUSAL_LM")


def fit_lora(model, train_blocks, genes: LoraGenes, *, seed: int, device="cpu"):
    """Wrap ``model`` (a HF causal LM, already on ``device``) with LoRA and train it.

    ``genes.steps`` AdamW steps on batches of ``genes.batch_size`` blocks drawn with replacement
    by a ``torch.Generator(seed)``; with rehearsal, each slot of a batch is an older block with
    probability ``genes.rehearsal`` (or the data's default share). The adapter's initialisation
    and dropout use the same seed inside a forked RNG, so the same seed gives identical adapter
    weights and the global RNG is left as it was.

    Args:
        model: the resident model; modified in place (LoRA layers injected) until :func:`unload`.
        train_blocks: token blocks to train on ([n, seq_len], numpy or torch), or a
            :class:`TrainingData` with older blocks to rehearse.
        genes: rank, alpha, dropout, target modules, learning rate, steps, batch size, rehearsal.
        seed: drives initialisation, dropout and batch order.
    Returns:
        ``(peft_model, stats)``; ``stats`` has ``loss_start``, ``loss_end`` (mean of the first and
        last up-to-5 steps), ``steps``, ``trainable_params``, ``rehearsal_share`` (the share
        used; 0 without older blocks) and ``seconds``. On an error the
        LoRA layers are removed again before it propagates.
    """
    from peft import get_peft_model

    data = TrainingData.of(train_blocks)
    share = data.share if genes.rehearsal is None else genes.rehearsal
    share = share if data.rehearsal is not None else 0.0
    t0 = time.perf_counter()
    device = torch.device(device)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config(genes), adapter_name=ADAPTER_NAME)
        peft_model._evo_restore = (requires_grad, was_training)  # read back by unload()
        try:
            peft_model.to(device)
            losses = _train(peft_model, data, share, genes, seed, device)
        except BaseException:
            unload(peft_model)
            raise
    peft_model.eval()
    k = min(5, len(losses))
    stats = {
        "loss_start": float(np.mean(losses[:k])),
        "loss_end": float(np.mean(losses[-k:])),
        "steps": len(losses),
        "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "rehearsal_share": float(share),
        "seconds": time.perf_counter() - t0,
    }
    return peft_model, stats


def _train(peft_model, data: TrainingData, share: float, genes: LoraGenes, seed: int, device) -> list[float]:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=genes.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    peft_model.train()
    losses = []
    blocks, older, bs = data.newest, data.rehearsal, genes.batch_size
    for step in range(genes.steps):
        batch = blocks[torch.randint(blocks.shape[0], (bs,), generator=gen)]
        if share > 0:  # draws only with rehearsal, so a share of 0 keeps the plain batch order
            pick = torch.rand(bs, generator=gen) < share
            batch = torch.where(pick[:, None], older[torch.randint(older.shape[0], (bs,), generator=gen)], batch)
        batch = batch.to(device)
        loss = peft_model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"LoRA fit: non-finite loss at step {step} (lr {genes.lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # one bad learning-rate draw should not blow the adapter up
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def unload(peft_model):
    """Remove the LoRA layers and return the original model, its weights untouched.

    peft's ``unload()`` puts each wrapped ``base_layer`` back, so the parameters are the same
    tensor objects as before :func:`fit_lora`; their ``requires_grad`` flags and the model's
    train/eval mode are restored too.
    """
    restore = getattr(peft_model, "_evo_restore", None)
    base = peft_model.unload()
    if restore is not None:
        requires_grad, was_training = restore
        for name, p in base.named_parameters():
            if name in requires_grad:
                p.requires_grad_(requires_grad[name])
        base.train(was_training)
    return base


@torch.no_grad()
def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The model's state dict with the adapter folded in (``W + B @ A * alpha / r``).

    Equivalent to peft's ``merge_and_unload`` on a copy, without copying the model: each LoRA
    layer's ``get_delta_weight`` is added to a clone of its base weight; every other tensor is
    cloned as is. Keys are the plain model's, so the result loads into a fresh model.
    """
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    deltas = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    key = f"{name}.weight"
                    delta = module.get_delta_weight(adapter)
                    deltas[key] = deltas[key] + delta if key in deltas else delta
    out = {}
    for key, tensor in inner.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        value = tensor.detach().clone()
        if plain in deltas:
            value += deltas[plain].to(value.dtype)
        out[plain] = value
    missing = set(deltas) - set(out)
    if missing:
        raise EvoError(f"merged_state_dict: no base weight for {sorted(missing)[0]}")
    return out


def save_adapter(peft_model, out_dir) -> Path:
    """Write the adapter as a PEFT directory (``adapter_config.json`` + safetensors), atomically:
    it is written to a sibling temp dir and renamed into place."""
    out = Path(out_dir)
    with staged_dir(out, replace=True) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
    return out
