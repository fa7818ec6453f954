"""The paper's claims measured on the embedded digits, in one place: the study behind
docs/results.md.

- `pagctl.study.plan`: what is trained and measured — a λ sweep for nearest-neighbour and
  score-based targets, three seeds of the headline comparison (vanilla, NN, SBG), four
  architecture families, each run attacked with AutoAttack in L2 and L∞ at two budgets and
  scored for alignment; a quick variant of the same shape for tests;
- `pagctl.study.run`: trains and measures what is missing (finished runs and recorded
  measurements are kept, so an interrupted study resumes); a record counts only when it
  bears itself out and names the study's points by the digests of their indices and
  images, else it is measured again;
- `pagctl.study.report`: reads the run folders back (through the same `study_records`) and
  writes the report — tables with n and intervals, the correlation between alignment and
  robustness with bootstrap intervals, the seeds' spread, and each of the paper's claims
  with the per-point McNemar test behind the verdict (compare's pairing,
  `pagctl.compare.pairing`; none between runs measured on other points); it replaces only
  a report and figure the study wrote;
- ``python -m pagctl.study`` (``make study``, ``make study-quick``) runs all three,
  ``--jobs N`` in N worker processes of one thread each.
"""
