"""Readable references for the seeds' other step-size methods, written from the papers.

Each module follows its paper's notation on a plain list of parameters with a closure,
uses the paper's defaults, and records its decisions (trial step sizes, the accepted
one, the losses it judged) per step in ``history`` so a fused implementation can be
compared with it decision for decision. Slow on purpose: clarity over speed.

- :mod:`reference.sls`: Adam+SLS (seed 001, section II).
- :mod:`reference.alsals`: ALSALS (seed 001, section III).
- :mod:`reference.labpal`: LABPAL, SGD and NSGD variants (seed 003, Algorithm 1).
- :mod:`reference.lr_factor`: the automated learning-rate factor scheduler (seed 004).
"""
