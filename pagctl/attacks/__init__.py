"""The built-in attacks, one module per family, each registered by name
(`pagctl.registry.BUILTIN_ATTACKS`) and found through the same loader as a plugin's.

- `base`: ``AttackBase``, the attack shell every family (and the example plugins) uses:
  params, build context, declared budget, seeded generator, the call's boundary;
- `steps`: the shared steps as functions: projections, random starts, gradient
  normalisation, loss gradients, the fit into a budget (L∞, L2, L1 and L0 in pixels);
- `fgsm`, `pgd`: one step and projected gradient descent (L∞, L2; cross-entropy, TRADES's KL
  or the Carlini–Wagner margin), untargeted or targeted, and EOT-PGD (gradients averaged
  over passes, for randomised models);
- `mifgsm`: momentum iterative FGSM (L∞), pgd with a momentum step;
- `pgd_l1`: PGD in L1 with sparse steps (SLIDE);
- `cw_linf`: "CW∞", PGD-L∞ on the Carlini–Wagner margin;
- `apgd`: Auto-PGD, untargeted and targeted (L∞, L2, L1);
- `fab`: the fast adaptive boundary attack (L∞, L2, L1);
- `square`: the score-based black-box Square Attack (L∞, L2, L1);
- `sparse_rs`: Sparse-RS, a score-based black-box random search in L0 (pixels changed);
- `cw`: Carlini–Wagner L2, a minimum-norm attack;
- `deepfool`: DeepFool (L2, L∞), a minimum-norm attack;
- `autoattack`: the AutoAttack ensemble of the above (standard, plus, rand).
"""
