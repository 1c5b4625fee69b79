"""What is searched and how: the search space (genes -> merge recipe, ``space``) and the
optimizers behind one ask/tell protocol (``optim``). Knows nothing of Ray or the loop.
"""
