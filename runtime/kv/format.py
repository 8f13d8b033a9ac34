"""How keys and values are stored in the paged cache: precision, block shape, bytes.

Layout (per layer, K and V alike; ``docs/kv-cache.md``):

* data   ``(num_blocks, kv_heads, block_size, packed_dim)``: the compute dtype (fp32/fp16/bf16), or
  uint8 holding int8 codes (``packed_dim = head_dim``) or two int4 codes per byte
  (``packed_dim = head_dim / 2``; element ``2j`` in the low nibble, ``2j + 1`` in the high one);
* params ``(num_blocks, kv_heads, block_size, 2)`` float16, only for int8/int4: ``[scale, zero]``
  of each token and head, so that ``x ≈ code * scale + zero`` (asymmetric, zero = the minimum).

Quantization (``runtime.kernels.paged.quantize``, the torch reference; the Triton write kernel does the same arithmetic):
``lo, hi = min, max over head_dim``; ``scale = fp16(clamp((hi - lo) / qmax, 2^-14, 65504))``, ``zero = fp16(lo)``;
``code = clamp(floor((x - zero) / scale + 0.5), 0, qmax)``. Scale and zero are rounded to float16
*before* the codes are computed, so the codes are chosen for the parameters actually stored.

Keys of a quantized cache are stored rotated by an orthonormal Hadamard matrix ``R`` (queries are
rotated by the same ``R`` before attention, so ``(q R) . (k R) = q . k``): a few channels of a key
carry most of its range, and the rotation spreads them over all channels, so a per-token scale wastes
fewer levels. Values are stored as they are: rotating them too moved SmolLM2's perplexity only
within noise, and would cost a rotation of the attention output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from formats.errors import TpDeployError
from runtime.kernels.paged import PARAM_DTYPE, TAIL_DTYPE

BLOCK_SIZE = 64  # tokens per block: a power of two, a whole number of kernel tiles

KV_DTYPES = ("auto", "fp32", "fp16", "bf16", "int8", "int4")
QUANT_POLICY = {0: "auto", 8: "int8", 4: "int4"}  # LMDeploy's --quant-policy
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class KVFormat:
    """One cache precision: ``bits`` 16/32 (float, stored as ``dtype``), 8 or 4 (codes + fp16 params)."""

    name: str
    dtype: torch.dtype  # storage dtype of the data tensor
    bits: int

    @property
    def quantized(self) -> bool:
        return self.bits in (4, 8)

    @property
    def channel_keys(self) -> bool:
        """int4 keys are scaled per channel over each full block (KIVI), the partial block kept in fp16."""
        return self.bits == 4

    @property
    def rotate_values(self) -> bool:
        """int4 values are stored rotated too (int8 values lose too little to be worth the output's rotation)."""
        return self.bits == 4

    def packed_dim(self, head_dim: int) -> int:
        return head_dim // 2 if self.bits == 4 else head_dim

    def block_bytes(self, head_dim: int, block_size: int) -> tuple[int, int]:
        """Bytes one block of one KV head takes in K and in V, parameters included."""
        data = block_size * self.packed_dim(head_dim) * self.dtype.itemsize
        if not self.quantized:
            return data, data
        per_row = 2 * PARAM_DTYPE.itemsize  # [scale, zero]
        return data + per_row * (head_dim if self.channel_keys else block_size), data + per_row * block_size


def kv_format(kv_dtype: str, compute_dtype: torch.dtype, head_dim: int) -> KVFormat:
    """The format for ``--kv-dtype`` (``auto`` = the compute dtype)."""
    if kv_dtype not in KV_DTYPES:
        raise TpDeployError(f"--kv-dtype {kv_dtype!r} is not supported; choose one of {', '.join(KV_DTYPES)}")
    if kv_dtype == "auto":
        name = {v: k for k, v in _FLOAT.items()}[compute_dtype]
        return KVFormat(name, compute_dtype, compute_dtype.itemsize * 8)
    if kv_dtype in _FLOAT:
        return KVFormat(kv_dtype, _FLOAT[kv_dtype], _FLOAT[kv_dtype].itemsize * 8)
    if kv_dtype == "int4" and head_dim % 2:
        raise TpDeployError(f"--kv-dtype int4 packs two values per byte and needs an even head_dim, got {head_dim}")
    return KVFormat(kv_dtype, torch.uint8, int(kv_dtype[3:]))


def from_quant_policy(policy: int) -> str:
    """LMDeploy's ``--quant-policy 0|8|4`` as a ``--kv-dtype`` name."""
    if policy not in QUANT_POLICY:
        raise TpDeployError(f"--quant-policy {policy} is not supported; LMDeploy's values are 0 (off), 8 (int8), 4 (int4)")
    return QUANT_POLICY[policy]


@dataclass(frozen=True)
class KVShape:
    """The cache of one rank: every layer, this rank's KV heads, in blocks of ``block_size`` tokens."""

    num_layers: int
    kv_heads: int
    head_dim: int
    fmt: KVFormat
    block_size: int = BLOCK_SIZE

    def __post_init__(self):
        b = self.block_size
        if b < 1 or b & (b - 1):
            raise TpDeployError(f"--block-size must be a power of two, got {b}")

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block in every layer, with the int8/int4 scales and zeros counted."""
        return self.num_layers * self.kv_heads * sum(self.fmt.block_bytes(self.head_dim, self.block_size))

    @property
    def bytes_per_token(self) -> float:
        """``bytes_per_block / block_size``: whole for every layout but int4 keys of a head_dim whose
        per-channel parameters do not divide evenly among a block's tokens."""
        per = self.bytes_per_block / self.block_size
        return int(per) if per.is_integer() else per

    def tail_bytes(self, slots: int) -> int:
        """The fp16 partial blocks of int4 keys for ``slots`` sequences (0 for other formats)."""
        if not self.fmt.channel_keys:
            return 0
        return slots * self.num_layers * self.kv_heads * self.block_size * self.head_dim * TAIL_DTYPE.itemsize

    def blocks_for(self, budget_bytes: int) -> int:
        return max(0, budget_bytes // self.bytes_per_block)


def key_rotation(head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(D, D) orthonormal, symmetric: block-diagonal Sylvester Hadamard blocks of the largest power of two
    dividing ``head_dim`` (all of it for 64 or 128)."""
    block = head_dim & -head_dim
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h / block ** 0.5] * (head_dim // block)).to(dtype=dtype, device=device)
