"""One candidate's score on an evaluator: merge, adapt (``lora``), measure (``fitness``, ``tasks``),
stopped early where it cannot win (``rejection``), on a subset of blocks (``subset``).
"""
