"""Evaluation: metrics, RICES in-context example selection, zero-/few-shot tasks and their callbacks."""
