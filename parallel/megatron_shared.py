"""What the Megatron adapter's two modules share: :mod:`.megatron` imports :mod:`.megatron_pingpong`
(lazily, where a spec asks for nano-batches), so the ping-pong layer cannot import it back."""

# plans (and nano-batch cuts) a spec keeps: interleaved pipeline chunks alternate a few batches
PLANS_KEPT = 8

__all__ = ["PLANS_KEPT"]
