"""Sparse autoencoders: models by name, the PatchSAE recipe, checkpoints."""
