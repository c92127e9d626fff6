"""Scoring a trained language model the way its users compare models.

* :mod:`~fedpeft.evaluation.multiple_choice`: MMLU-style benchmarks by log-likelihood
  (the bundled ``wordnet-mc``, local files, hub sets);
* :mod:`~fedpeft.evaluation.generation`: answers to a file of prompts, for judges.
"""
