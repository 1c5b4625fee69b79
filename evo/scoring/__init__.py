"""One candidate's score on an evaluator: what evaluators hold resident (``sources``), merge and
measure (``evaluator``, ``fitness``), adapt (``lora``), layer paths (``path``), tasks (``tasks``),
stopped early where it cannot win (``rejection``), on a subset of blocks (``subset``).
"""
