"""Stages: pure functions of sample columns (+ embeddings) that return per-sample decisions."""

from .base import (DECISION_COLUMNS, ArrayEmbeddings, EmbeddingView, Stage, StageInput, StageResult,
                   decisions_frame, get_stage, register_stage, stage_names)

__all__ = ["DECISION_COLUMNS", "ArrayEmbeddings", "EmbeddingView", "Stage", "StageInput", "StageResult",
           "decisions_frame", "get_stage", "register_stage", "stage_names"]
