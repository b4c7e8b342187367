"""Benchmarks behind ``kvshare bench ...``.

Each compares against a baseline measured in the same run, on the same data.
"""
