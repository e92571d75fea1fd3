"""Training: corpus and batches, tokenizers, a model-agnostic loop, checkpoints, data-parallel set-up."""
