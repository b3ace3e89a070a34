"""Loss kernels: per-token log-probs and entropy from hidden states, without full logits.

Packaged as ``lightning_rl.kernels``. No Lightning import here: the kernels are plain torch
(and Triton, where available) so they can be tested and benchmarked on their own.
"""

from lightning_rl.kernels.reference import token_logprobs_entropy_reference

__all__ = ["token_logprobs_entropy_reference"]
