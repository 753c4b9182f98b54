"""Embedded worlds: small synthetic domains with a renderer, a prompt grammar and an exact verifier.

They let the whole RL pipeline run on a CPU with no downloads.
"""
