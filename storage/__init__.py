"""kvshare.storage: KV chunk format, tiers (GPU, CPU, disk, Redis) and the LanceDB index.

Never imports the connector side (``kvshare`` top-level modules other than config)."""
