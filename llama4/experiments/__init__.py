"""Controlled studies on models trained here: one command each, results with their pass criteria.

    llama4 experiment irope --out DIR [--seeds 2] [--quick]     iRoPE length generalisation (irope/)
"""
