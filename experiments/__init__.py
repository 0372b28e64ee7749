"""Experiments beside the library: peers and references that tests and benchmarks share.

Not installed with ``hf_koleo`` (``setup.cfg`` finds ``hf_koleo*`` only) and never imported by it
at import time; run from a checkout.
"""
