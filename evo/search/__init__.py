"""What is searched and how: typed genes (``genes``), the search space (genes -> ``Recipe``,
``space``; a candidate as plain data, ``recipe``), layer paths (``dataflow``) and the optimizers
behind one ask/tell protocol (``optim``). Knows nothing of Ray or the loop.
"""
