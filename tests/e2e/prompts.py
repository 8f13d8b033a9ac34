"""The real-model prompts every SmolLM2 parity test uses, and what they may differ by."""

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
]
NEW_TOKENS = 32
# fp32 on both sides; logits of magnitude ~20 differ by summation order only (fused qkv/gate_up,
# and at tp 3 the all-reduce of three partial sums).
LOGIT_ATOL = 2e-4
