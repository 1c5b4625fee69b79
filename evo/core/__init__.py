"""The ground layer every other layer reads, importing nothing of evo above it: errors
(``errors``), the experiment config's schema (``config``, built by ``schema``, checked by
``validate``), filesystem helpers (``fs``: atomic writes, staged folders, readers with one-line
errors), dtypes and tensor <-> array conversion (``tensors``), model entries (``paths``), typed
records that cross layers (``records``) and what the CPU can do (``hardware``).
"""
