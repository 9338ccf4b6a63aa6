"""The bundled demo that `dpokit quickstart` runs: `model/` (a 1M-parameter Llama with its tokenizer),
`data/` (helpful-vs-rude preference pairs, and ranked and unpaired variants) and `reward_model/` (a tiny
sequence classifier that scores helpful replies above rude ones, for the on-policy loop). Installed as the
package data of ``dpokit.demo``; rebuilt by ``examples/make_demo_data.py``, ``examples/make_demo_model.py`` and
``examples/make_demo_reward_model.py``."""
