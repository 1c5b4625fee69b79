"""The loop (``driver``) over data versions (``versions``): generations (``generation``,
``steady_state``), the selection stage and release rule that end a version, stop signals.
"""
