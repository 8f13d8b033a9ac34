"""tpconv: offline, streaming conversion of Hugging Face checkpoints into tpdeploy workspaces."""

__version__ = "0.1.0"
