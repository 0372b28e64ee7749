"""Experiments beside the library: the KoLeo-proto study, the benchmark suites, the frozen-head
experiment, and the peers and references that tests and benchmarks share.

Not installed with ``hf_koleo`` (``setup.cfg`` finds ``hf_koleo*`` only) and never imported by it
(``tests/test_layers.py``); run from a checkout through ``scripts/``.
"""
