"""Experiments beside the library: one harness (``python -m experiments plan|run|report SPEC``) for
the studies and benchmarks, their run kinds and reports, and the peers and references that tests and
benchmarks share.

Not installed with ``hf_koleo`` (``setup.cfg`` finds ``hf_koleo*`` only) and never imported by it
(``tests/test_layers.py``); run from a checkout.
"""
