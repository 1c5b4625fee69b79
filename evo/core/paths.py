"""Model entries as a config names them: a folder, a GGUF file, or ``package:FILE`` inside an
installed package. Parsing them is the schema's job (the config resolves and checks them);
converting a GGUF file is the zoo layer's (``evo.zoo.gguf``)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from evo.core.errors import EvoError

GGUF_SUFFIX = ".gguf"


def is_gguf_spec(spec) -> bool:
    """True for a model entry that names a GGUF file: ``path/x.gguf`` or ``package:x.gguf``."""
    return isinstance(spec, (str, os.PathLike)) and str(spec).lower().endswith(GGUF_SUFFIX)


def resolve_gguf(spec) -> Path:
    """The GGUF file ``spec`` names: a path, or ``package:FILE`` inside an installed package."""
    text = str(spec)
    package, _, name = text.partition(":")
    if names_package(text):
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise EvoError(f"{text}: package {package!r} is not installed (or is not a package)")
        path = Path(list(found.submodule_search_locations)[0]) / name
    else:
        path = Path(text).expanduser()
    if not path.is_file():
        raise EvoError(f"{path}: GGUF file not found")
    return path.resolve()


def names_package(text: str) -> bool:
    """``pkg:FILE``: a dotted identifier before the colon ("C:\\x.gguf" and real paths are paths)."""
    package, sep, _ = text.partition(":")
    return bool(sep) and len(package) > 1 and package.replace(".", "").replace("_", "").isalnum() \
        and not Path(text).exists()
