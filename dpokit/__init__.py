"""dpokit: preference fine-tuning (DPO and relatives) with a reference model that runs once."""

__version__ = "0.1.0"
