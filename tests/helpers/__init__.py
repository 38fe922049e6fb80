"""What the tests share, so that no test module imports another.

- ``events``: the fixed clock (``NOW``), time units, event builders, ``total``.
- ``alerts``: reading a subscription (``take``, ``assert_quiet``) and checking seqs.
- ``wire``: frames for raw-socket tests (``frame``, ``framed``, ``hello``).
- ``serve``: ``meter serve`` as a subprocess (the launcher is ``benchmarks/serve.py``).
- ``strategies``: the Hypothesis inputs of the model tests.
- ``internals``: the one place where tests reach into engine internals.
"""
