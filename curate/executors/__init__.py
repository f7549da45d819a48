"""Executors run stages over a pool and record what they decide; stages never know which one runs them."""
