"""Errors and the experiment config (validated, then frozen): what every layer reads.
"""
