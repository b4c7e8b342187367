"""kvshare.kernels: Triton kernels, each beside its PyTorch reference.

Each kernel module holds the reference and one dispatch function that runs the Triton
kernel on CUDA tensors and the reference elsewhere; the Triton code sits in the
``_<name>_triton`` module beside it, imported only on CUDA (so CPU hosts need no Triton).

==========================  =============================================================
``rope_shift_scatter``      reused K/V rows from loaded chunks into the dense KV and a
                            paged cache, keys re-rotated by their position deltas
``partial_attention``       attention of selected queries over a request's whole KV,
                            causal by position, GQA, several requests per launch
``rms_norm``                residual add + RMSNorm of a decoder layer, one pass
``rotary``                  neox RoPE on a layer's queries and keys, one launch
==========================  =============================================================
"""
