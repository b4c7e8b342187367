"""kvshare.storage: KV chunk format, tiers (GPU, CPU, disk, Redis) and the LanceDB index.

Dependencies point one way: nothing here imports from ``kvshare`` outside
``kvshare.storage`` and ``kvshare.kernels``; storage classes take plain arguments and
``kvshare.tiers_setup`` turns a config into them.
"""
