"""Data: records, answer grading (the benchmark loaders and the synthetic world come later)."""
