"""Isolation of a new version's first load: load and warm it up in a limited child first.

:mod:`.prober` holds both sides: the ``Prober`` in the serving process, and the helper
process it starts (``python -m serving.isolation.prober``).
"""
