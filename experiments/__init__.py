"""Runnable studies, one per module: ``python -m experiments.NAME [--flags]``.

Importing the package (or any experiment) changes nothing in the process: each ``main`` first
calls ``experiments.common.prepare_process()`` for the allocator settings it needs.
"""
