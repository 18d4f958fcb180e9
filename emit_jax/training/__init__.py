"""Training building blocks: data preparation, the SFT learner, checkpoints, progress."""
