"""Text into token blocks: corpora from installed packages (``corpus``), documents read, cleaned
and keyed by content (``text``), the held-out and selection splits (``splits``), token blocks
(``tokens``), per-generation block draws and paired intervals (``draws``), and a folder of data
shards cleaned and de-duplicated (``dedup``) into data versions (``stream``, ``stream_state``).
"""
