"""What every evaluation shares, whatever it measures (an attack, an alignment score).

- `request`: ``EvaluationRequest``, how an evaluation measures (points, batches, seed,
  precision, progress file, shards), one frozen value from the command's options or the
  API's keywords down to the batch loop, and the checks every evaluation runs on it;
- `state`: ``KeyedState``, the one resumable, mergeable progress file, keyed by the
  evaluation that wrote it (``evaluation_key``);
- `sharding`: the one shard / merge / torchrun driver: which batches a shard owns, where its
  progress lives, how N shards merge.

The evaluations themselves are `pagctl.robustness.evaluate.evaluate_attack` and
`pagctl.align.evaluate_alignment`.
"""
