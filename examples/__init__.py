"""Runnable examples (``python examples/pretrain_gpt.py``). Tests and benchmarks import them as
``examples.gpt`` etc.: ``examples/gpt.py`` is the one home of the small GPT they all train."""
