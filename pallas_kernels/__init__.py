"""Pallas (Triton backend) kernels of the chunked Householder-product scan (SPEC §2).

Forward stages, one module each: ``prepare`` (UT transform per interleaved chunk), ``state_pass``
(the sequential chunk recurrence), ``output`` (outputs per token chunk); ``forward`` composes them
on plain arrays. Backward stages: ``backward_recompute`` (v_new, interleaved chunk states, the
output's dv_new part), ``backward_state_pass`` (reverse scan), ``backward_output`` (dq, the
output's dk), ``backward_state_adjoint`` (dW, the state update's dk), ``backward_wy`` (dk, dv,
dbeta, gate terms); ``backward`` composes them. ``short_conv`` is the one-pass backward of the
models' short convolution (``dpjax.nn.conv``). ``common`` holds shared helpers. Differentiation
and the public op live in ``dpjax.ops.pallas`` (this package never imports ``dpjax``).
"""
