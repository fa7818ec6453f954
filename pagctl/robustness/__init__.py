"""Robustness evaluation: how well a model resists attacks, and whether that can be trusted.

- `engine`: ``run_attack``, clean and robust accuracy of a model on a test subset, stage by
  stage, every attack call checked against the plugin contract;
- `report`: ``AttackReport``, what a run measured (per stage: ``records.StageRecord``);
- `state`: ``AttackState``, a run's progress in the ``--state`` file, for resuming;
- `evaluate`: ``evaluate_attack``, one evaluation as ``pagctl attack`` runs it (subset,
  probes, ε-sweep, verdict);
- `reliability`: the gradient-masking probes and the reliability verdict;
- `targeted`: targeted PGD toward every class (the "turn toward class" figure).

The attacks themselves are plugins (`pagctl.attacks`).
"""
