"""The reference side of DPO, in one package.

- `dpokit.reference.compute`: the pass (`dpokit ref-logps`): the frozen reference once over prepared
  data, on 1..N processes, into ``ref.h5``.
- `dpokit.reference.cache`: the ``ref.h5`` format: create, resume, commit rows crash-safely, read.
- `dpokit.reference.source`: what training reads: `CachedReference` (the file) or `LiveReference`
  (a model run on the fly), both giving a `ChosenRejectedOutputs` per batch.
- `dpokit.reference.inspection`: `dpokit cache info` and `dpokit cache verify`.
- `dpokit.reference.audit`: `dpokit cache audit`: what the reference thinks of the data, and a filtered
  copy of the data with its cache; `dpokit.reference.group_audit` the numbers of ranked and unpaired data, and
  `dpokit.reference.audit_stats` what both compute (distributions, duplicate prompts, previews).
"""
