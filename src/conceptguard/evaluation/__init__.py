"""Evaluation: seeded generation, detector-based erasure/preservation metrics, quality metrics."""
