"""The Ray side: the pool of resident-model evaluators (``pool``), the memory plan that sizes it
(``memory``) and the metrics the dashboard shows (``metrics``).
"""
