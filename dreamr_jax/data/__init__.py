"""Data: the paper's data sets (`datasets`), answer extraction and grading (`grading`), the
embedded synthetic world (`synthetic`, `world_tokenizer`) and its training pipeline (`pipeline`)."""
