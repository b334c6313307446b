"""Adapters for the evaluation harnesses users already run (optional extras).

- :mod:`hybridkv.integrations.lm_eval`: a ``hybridkv`` model for EleutherAI's
  lm-evaluation-harness (``pip install 'hybridkv[lm-eval]'``).
- :mod:`hybridkv.integrations.lmms_eval`: a ``hybridkv`` model for lmms-eval
  (``pip install 'hybridkv[lmms-eval]'``), registered through an entry point.

Both answer through :class:`hybridkv.integrations.runner.CompressedRunner`, the path of
``hybridkv eval``; see ``docs/integrations.md``.
"""
