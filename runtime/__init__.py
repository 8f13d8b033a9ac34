"""tprun: the lightweight tensor-parallel runtime (never imports transformers or converter)."""

__version__ = "0.1.0"
