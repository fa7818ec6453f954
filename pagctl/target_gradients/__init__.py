"""The built-in target-gradient sources g(x, t), one module each, registered by name
(`pagctl.registry.BUILTIN_TARGET_GRADIENTS`) and found through the same loader as a
plugin's.

- `none`: no target gradients (cross-entropy alone);
- `one_image`, `class_mean`, `nearest_neighbor`: the paper's training-image sources (OI,
  CM, NN), built on the shared training pool (`_pool`);
- `sbg`: Score-Based Gradients from a class-conditional score model (`pagctl.score`);
- `precomputed`: per-image, per-class targets served from a bank file (`pagctl.banks`);
- `toy_score`: the exact score of the 2-D toy mixture.
"""
