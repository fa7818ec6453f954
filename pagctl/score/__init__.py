"""Class-conditional score models, the source of Score-Based Gradients (``sbg``).

- `spec`: ``ScoreSpec`` and its sections, built-in score specs, ``load_score_spec``;
- `nets`: the networks inside a score model (a small U-Net, a residual MLP);
- `model`: ``ScoreModel`` (EDM preconditioning), the sampler, saving and loading a run;
- `train`: ``train_score``, denoising score matching (``pagctl train-score``);
- `figures`: the samples figure of a score run (samples.png).

The ``sbg`` source that serves the trained model's gradients is a plugin
(`pagctl.target_gradients.sbg`).
"""
