"""tprun: the lightweight tensor-parallel runtime (never imports transformers or converter)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import runtime` (and worker processes) do not pay for the whole API.
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from runtime import api
        return getattr(api, name)
    if name == "SamplingParams":
        from runtime.engine.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(name)
