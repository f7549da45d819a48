"""Scoring: safe decode (decode.py), preprocessing (preprocess.py), devices and batch-size
back-off (device.py), and multi-model batched inference (infer.py)."""
