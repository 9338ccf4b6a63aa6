"""On-policy data: completions sampled from a model, scored, and selected into training data.

- `dpokit.onpolicy.sample`: `dpokit sample`: k completions per prompt from any model dpokit loads, seeded,
  sharded over processes and resumable, into a ``samples/`` folder.
- `dpokit.onpolicy.score`: `dpokit score`: a reward model's (or a Python function's) score for each completion.
- `dpokit.onpolicy.select`: `dpokit select`: pairs or ranked groups from the scored completions (best-vs-worst,
  best-vs-random, all, RSO's statistical rejection sampling), written as prepared data.
- `dpokit.onpolicy.sampled_reference`: ``sample --ref-logps``: the sampler's own log-probs of its completions (it is
  the reference), carried through score, and the reference cache select writes from them.

docs/on-policy.md describes the folders and the loop.
"""
