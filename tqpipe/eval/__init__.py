"""Evaluation pieces used by the validate stage: texts and statistics."""
