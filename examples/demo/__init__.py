"""The bundled demo that `dpokit quickstart` runs: `model/` (a 1M-parameter Llama with its tokenizer)
and `data/` (helpful-vs-rude preference pairs). Installed as the package data of ``dpokit.demo``;
rebuilt by ``examples/make_demo_data.py`` and ``examples/make_demo_model.py``."""
