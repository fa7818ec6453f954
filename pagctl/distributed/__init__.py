"""Beyond one process, with the engine PyTorch users already run: ``torchrun`` and
``torch.distributed``.

- `pagctl.distributed.launch`: who this process is in a torchrun launch, the process group
  it joins for one command, its device.
- `pagctl.distributed.replicas`: data-parallel training: each process a replica of the model
  that takes its slice of every global batch; gradients summed, BatchNorm statistics over the
  whole batch, replicas kept identical.

Sharded evaluation under torchrun is `pagctl.evaluation.sharding`.
"""
