"""effopd: on-policy distillation (OPD), the EffOPD extrapolation accelerator, and
parameter-dynamics analysis of the resulting checkpoints.

Tensor naming convention. Tensors carry a suffix naming their dimensions:

    B  batch (one row per sampled response)
    P  prompt tokens (left-padded)
    T  response tokens (right-padded)
    L  full sequence = P + T
    V  vocabulary

so ``logp_BT`` is a per-token log-probability of shape (B, T), ``mask_BT`` marks the real
(non-padding) response tokens with 1, and ``reward_B`` holds one scalar per response.
"""

__version__ = "0.1.0"
