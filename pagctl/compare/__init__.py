"""Put run folders side by side, from ``spec.json`` and ``metrics.jsonl`` only.

Weights are never read, and neither torch nor numpy is imported, so comparing a hundred runs
takes a fraction of a second (one pass over each metrics file, linear in its lines).

Rows and columns
----------------
One row per run. Spec columns: every dotted spec field (``model_dump()`` flattened,
plugin ``params`` included) whose value differs across the runs, except ``name``,
``description`` and ``out_dir``. λ (``train.pag_weight``) counts as 0 when the source is
``none``, so two baselines never differ by a weight nothing uses. The run name is always
shown (its folder instead when two runs share a name).

Metric columns, each from the *latest* record (file order) of its key:

- ``clean``: clean accuracy, from the attack records and the last evaluated training epoch.
  Each run contributes its latest measurement on a subset every run has measured (the
  largest such subset); when no subset is common to all runs, its latest measurement.
  Attack records written before the last training epoch (older weights) are not used here.
- ``robust ATTACK NORM eps=E``: robust accuracy, one column per (attack, norm, ε) of the
  ``attack`` records. ε are equal when they agree to 9 significant digits.
- ``align SOURCE``: mean cosine, one column per (source, source params) of the ``align``
  records.
- ``align (train monitor) SOURCE``: the alignment of the last training epoch that has one
  (its source is ``eval.align_source``, else the training source). Shown only when some run
  has no ``align`` record at all.

Every cell carries n and, where the record has it, the 95% Wilson interval (computed from
the counts for the training monitor's clean accuracy; the monitor's alignment has none).
The subset of the training monitor is the first ``n_test`` test points, whose digest is
computed the way ``pagctl attack`` computes it, so a ``--limit N`` attack and a monitor on N
points count as the same subset.

What is marked, or refused with ``strict=True``
-----------------------------------------------

1. *Different subsets*: two cells of one column whose ``subset.indices_sha256`` differ (a
   cell without a subset digest cannot be checked and is accepted).
2. *Different ε or norms*: the runs that have any robust accuracy share no (norm, ε)
   budget, i.e. no budget at which every one of them was attacked. A run lacking a column
   only shows "-"; different attacks at a shared budget are fine (each has its column).

By default the comparison is made and every such problem is listed in
``Comparison.mismatches`` and marked in the output (a ``≠`` on the column header in tables,
``mismatch`` fields in json and csv, a warning line on stderr). With ``strict=True``
(``pagctl compare --strict``) the first problem is the error instead (robust columns are
checked first, then alignment, clean accuracy and the training monitor; the count of the
others is appended). The alignment's K (``classes_per_image``) is not checked: K classes
drawn uniformly without replacement estimate the same all-class mean.

Per-example comparison
----------------------
For every robust column and every pair of runs whose records hold ``per_example.robust``
bits on the same subset: the points both runs defend, only A, only B, neither, and the
exact two-sided McNemar p-value (binomial test of ``a_only`` against ``a_only + b_only``
draws at 1/2): `pagctl.compare.pairing.pair`, the one pairing of runs, which the study's
verdicts use too.

Warnings
--------
Corrupt metrics lines (not UTF-8, not JSON, not an object, no ``kind``, a known kind with
fields of the wrong type or out of range) are skipped and reported in
``Comparison.warnings`` as ``warning: runs/x/metrics.jsonl line 7: not valid JSON;
skipped``; the caller prints them on stderr. Records of unknown kinds are ignored. A
metrics file that is a symbolic link out of its folder, or cannot be read, is one warning
and no records. An attack or align value written before the run's last training epoch
measured older weights and is reported too. A robust value whose attack failed its
reliability checks is marked ``!`` in tables and markdown (``reliable`` in json).

Output formats (:func:`render`)
-------------------------------
``table`` (rich text, plain, as wide as the terminal: values as
``0.612 [0.561, 0.660] n=360``, the interval on a second line when one-line cells would not
fit; at most 6 spec columns and 40 pairs, the rest named below it), ``markdown`` (the same
as pipe tables, everything), ``json`` (``{"runs", "columns", "pairs", "mismatches",
"warnings"}``, numbers in separate fields), ``csv`` (one row per run with flat columns
``LABEL``, ``LABEL lo``, ``LABEL hi``, ``LABEL n``, ``LABEL subset`` and ``mismatch``; when
there are pairs, an empty line and then a second csv table of them).

Figure (:func:`plot`)
---------------------
PNG, PDF or SVG by the file's suffix, at ``dpi`` (default 200). Left: robust accuracy vs ε,
a line per run and (attack, norm), 95% intervals as error bars; at a single ε, robust
accuracy by run at that ε. Right: alignment vs robust accuracy, a point per run, Pearson's
r in the title (from 3 runs on; fewer, or no variation, is said instead). One colour per run
in every panel, one marker per attack, each with its legend. x is the alignment column with
values in the most runs (``align`` records before the training monitor at equal counts); y
is the robust column named by ``robust`` (``--robust-column``), by default the one with
values in the most runs, ties to the widest spread across runs, then the largest ε.

Layout
------
``model`` (the dataclasses), ``records`` (the kinds compare reads, through the file's one
reader `pagctl.checkpoint.read_metrics`, never raising), ``spec_columns`` (flattened,
differing spec fields), ``runs`` (one run's records as cells), ``pairing`` (two runs'
per-point results on the same points, McNemar: `pair`), ``build`` (columns, checks, pairs:
`compare_runs`), ``rendering`` (`render` and its formats) and ``figure`` (`plot`). The
statistics (Wilson, McNemar, Pearson, subset digests, per-example bits) are `pagctl.stats`.
"""
