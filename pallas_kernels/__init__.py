"""Pallas (Triton backend) kernels of the chunked Householder-product scan (SPEC §2).

Forward stages, one module each: ``prepare`` (UT transform per interleaved chunk), ``state_pass``
(the sequential chunk recurrence), ``output`` (outputs per token chunk); ``forward`` composes them
on plain arrays; ``common`` holds shared helpers. Differentiation and the public op live in
``dpjax.ops.pallas`` (this package never imports ``dpjax``).
"""
