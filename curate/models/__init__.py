"""Scorer models: `--model SPEC` strings (specs.py) and turning them into loaded open_clip models
(loader.py). docs/models.md documents the spec syntax, aliases and cache behaviour."""

from .specs import ALIASES, ModelSpec, parse_spec

__all__ = ["ALIASES", "ModelSpec", "parse_spec"]
