"""The Ray side: starting or joining Ray (``bootstrap``), the checks before connecting
(``network``) and before placing evaluators (``placement``), the pool of resident-model
evaluators (``pool``), the memory plan that sizes it (``memory``) and the dashboard's metrics
(``metrics``).
"""
