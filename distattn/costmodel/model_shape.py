"""One description of a model's shape and everything derived from it: parameter counts, model FLOPs
per step, and the GPUs' dense bf16 peaks -- read by the trainer (MFU, the memory estimate, ``--dry-run``)
and the simulator alike, so the two count the same model the same way.

Standard library only: ``distattn simulate --help`` lists the presets without importing torch.

Counts, for a Llama-style block (``hd = head_dim``, by default ``dim // n_heads``; ``m`` the MLP's
matrices, 3 for a gated one (SwiGLU), else 2; untied: a separate output projection)::

    layer_matmul_params = dim * hd * (2 n_heads + 2 n_kv_heads) + m dim ffn_dim    (wq, wo, wk, wv, MLP)
    block_params        = layer_matmul_params + 2 dim (its norms) + n_heads (sinks, if any)
    root_params         = vocab_size * dim * (1 if tied else 2) + dim (final norm)
    params              = root_params + n_layers * block_params             (== the module's numel)
    matmul_params       = n_layers * layer_matmul_params + vocab_size * dim  (MFU's N: no embedding lookup)
    model_flops         = 6 N tokens + 3 n_layers attention_forward_flops    (PaLM's MFU; no recomputation)
    pair_weight()       = (1 + BWD_FLOPS_FACTOR) 4 n_heads hd / (6 layer_matmul_params)
                          (a query-key pair's FLOPs over a token's linear FLOPs; backward = 2.5 x forward)
"""

from __future__ import annotations

from dataclasses import dataclass

# attention's backward FLOPs over its forward's (FlashAttention's convention; distattn.costmodel.cost prices with it):
# here, not in cost, because cost imports this module
BWD_FLOPS_FACTOR = 2.5


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape (the trainer's ``model:`` keys; ``head_dim``: None for
    ``dim // n_heads``, or a head width of its own, as Megatron's ``kv_channels``; ``gated_mlp``: the
    MLP has three matrices, SwiGLU's, rather than two)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    tie_embeddings: bool = False
    attention_sinks: bool = False
    name: str = ""
    head_dim: int | None = None
    gated_mlp: bool = True

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        elif isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"head_dim must be a positive int or None (dim // n_heads), got {self.head_dim!r}")

    @property
    def qkv_params(self) -> int:
        """Parameters of the Q, K and V projections of one block."""
        return self.dim * self.head_dim * (self.n_heads + 2 * self.n_kv_heads)

    @property
    def layer_matmul_params(self) -> int:
        """Parameters of one block that take part in a matmul per token: its projections and MLP."""
        mlp = (3 if self.gated_mlp else 2) * self.dim * self.ffn_dim
        return self.qkv_params + self.dim * self.n_heads * self.head_dim + mlp

    @property
    def block_params(self) -> int:
        """Parameters of one block: its projections, MLP, two norms and any attention sinks."""
        return self.layer_matmul_params + 2 * self.dim + (self.n_heads if self.attention_sinks else 0)

    @property
    def root_params(self) -> int:
        """Parameters outside the blocks: the embedding, the final norm and an untied head."""
        return self.vocab_size * self.dim * (1 if self.tie_embeddings else 2) + self.dim

    @property
    def params(self) -> int:
        """Every parameter (a tied embedding counted once)."""
        return self.root_params + self.n_layers * self.block_params

    @property
    def matmul_params(self) -> int:
        """MFU's N: the blocks' projections and the output projection (not the embedding lookup,
        the norms or RoPE)."""
        return self.n_layers * self.layer_matmul_params + self.vocab_size * self.dim

    def pair_weight(self) -> float:
        """Attention FLOPs of a visible query-key pair (forward and backward: ``1 + BWD_FLOPS_FACTOR``
        times the forward's ``4 * n_heads * head_dim``) per linear FLOP of a token
        (``6 * layer_matmul_params``): where :func:`distattn.runtime.pingpong.split_nano_batches` cuts to
        balance the two."""
        return (1 + BWD_FLOPS_FACTOR) * 4 * self.n_heads * self.head_dim / (6 * self.layer_matmul_params)

    def model_flops(self, tokens: float, attention_forward_flops: float) -> float:
        """Forward + backward model FLOPs of a step over ``tokens`` tokens whose attention (one layer,
        forward, all ranks) costs ``attention_forward_flops``."""
        return 6.0 * self.matmul_params * tokens + 3.0 * self.n_layers * attention_forward_flops


@dataclass(frozen=True)
class GPU:
    """A GPU's dense bf16 peak (vendor data sheets, no sparsity) and memory in GiB (data sheets say GB
    and mean GiB: an 80 GB H100 holds 80 GiB; ``distattn train --dry-run --gpu-memory-gib`` takes the
    same number); ``fragments``: what its ``torch.cuda.get_device_name`` contains."""

    name: str
    peak_tflops: float
    memory_gib: float
    fragments: tuple[str, ...]


# the first GPU whose fragment a device name contains wins: more specific names first
GPU_TABLE = (GPU("h100-pcie", 756.0, 80.0, ("H100 PCIe",)), GPU("h100", 989.0, 80.0, ("H100",)),
             GPU("gh200", 989.0, 96.0, ("GH200",)), GPU("h200", 989.0, 141.0, ("H200",)),
             GPU("h800", 989.0, 80.0, ("H800",)), GPU("b200", 2250.0, 180.0, ("B200",)),
             GPU("b100", 1750.0, 180.0, ("B100",)), GPU("a100", 312.0, 80.0, ("A100",)),
             GPU("a800", 312.0, 80.0, ("A800",)), GPU("l40s", 362.0, 48.0, ("L40S",)),
             GPU("a10g", 70.0, 24.0, ("A10G",)), GPU("mi300x", 1307.0, 192.0, ("MI300X",)),
             GPU("mi250x", 383.0, 128.0, ("MI250X",)))
GPUS = {g.name: g for g in GPU_TABLE}


def gpu_named(device_name: str) -> GPU | None:
    """The table's GPU for a ``torch.cuda.get_device_name``, or None."""
    return next((g for g in GPU_TABLE if any(f in device_name for f in g.fragments)), None)


MODELS = {m.name: m for m in (
    ModelShape(4096, 32, 32, 8, 14336, 128256, name="llama3-8b"),
    ModelShape(8192, 48, 64, 8, 22016, 32000, name="llama-34b"),
    ModelShape(8192, 80, 64, 8, 28672, 128256, name="llama3-70b"),
)}

__all__ = ["ModelShape", "GPU", "GPU_TABLE", "GPUS", "MODELS", "gpu_named", "BWD_FLOPS_FACTOR"]
