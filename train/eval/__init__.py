"""Evals of a trained model: held-out bits per byte by position, synthetic retrieval (passkey, RULER-style
needles, variable tracking, an image needle) scored by log-likelihood and greedy generation, and MSA
diagnostics (index recall, the indexer's recall of needle blocks). ``train.eval.runner.evaluate`` is the
library call; ``python -m train.eval`` the Hydra app; ``eval.every`` runs it during training."""
