"""katdata: build KAT-style adaptive-thinking data and adapt a model to it.

Importing katdata loads no torch, transformers, vllm, datasets or argilla: the stages and
backends that need them import them when they run.
"""

__version__ = "0.1.0"
