from dpokit.cli import entry

entry()  # `python -m dpokit` is the `dpokit` command: one command in a process of its own
