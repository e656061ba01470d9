"""Evaluation: baseline vs fine-tuned on a failure mode's held-out frames, per-frame errors and reports."""
