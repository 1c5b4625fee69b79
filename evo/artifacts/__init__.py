"""What a run leaves on disk and what reads it: the run store and checkpoint, releases (``release``
exports; ``fitness``, ``card``, ``manifest``, ``portable``, ``verify``), the HTML report and
``evo status``. Never imports the loop.
"""
