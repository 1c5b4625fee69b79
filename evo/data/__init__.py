"""Text into token blocks: corpora (``corpus``), the evaluation, selection and test splits and the
sources evaluators hold (``sources``), per-generation block draws (``draws``) and a folder of
data shards cleaned and de-duplicated into data versions (``stream``).
"""
