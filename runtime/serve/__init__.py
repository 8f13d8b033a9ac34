"""``tprun serve``: the continuous-batching engine loop, the memory plan, and the OpenAI-compatible API."""
