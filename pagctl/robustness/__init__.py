"""Robustness evaluation: how well a model resists attacks, and whether that can be trusted.

- `engine`: ``run_attack``, clean and robust accuracy of a model on a test subset, stage by
  stage, every attack call checked against the plugin contract;
- `report`: ``AttackReport``, what a run measured (per stage: ``records.StageRecord``);
- `state`: ``AttackState``, a run's progress (the ``--state`` file, a shard's file), for
  resuming and merging (its file: `pagctl.evaluation.state.KeyedState`);
- `evaluate`: ``evaluate_attack`` of an ``AttackJob``, one evaluation as ``pagctl attack``
  and `pagctl.api.attack` both run it (subset, probes, ε-sweep, shards, verdict);
- `reliability`: the gradient-masking probes and the reliability verdict;
- `budget`: an ε whose ball holds the whole pixel box (warned about, or refused);
- `targeted`: targeted PGD toward every class (the "turn toward class" figure);
- `exports`: what ``--export`` and ``--save-adversarial`` write: per-example and per-class
  CSVs, a RobustBench-style result JSON, the adversarial images.

The attacks themselves are plugins (`pagctl.attacks`).
"""
