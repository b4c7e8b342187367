"""kvshare's vLLM KV connector: ``kv_connector_module_path="kvshare.connector"``."""

from kvshare.connector.connector import KVShareConnector

__all__ = ["KVShareConnector"]
