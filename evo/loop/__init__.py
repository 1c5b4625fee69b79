"""The loop (``driver``) over data versions (``versions``), from a config completed where the
layers meet (``experiment``): generations (``generation``, ``steady_state``), the selection stage
(``selection``, ``racing``) and release rule that end a version, LoRA starts (``adapt``), stops.
"""
