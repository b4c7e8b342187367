"""The shared ``kvshare daemon`` and its clients.

``server`` runs one catalog and one chunk store for every vLLM instance on a host;
``client`` gives connectors in ``mode: remote`` the same ``Catalog`` and ``ChunkStore``
interfaces over ZeroMQ; ``protocol`` is the wire format between them; ``auth`` derives the
CURVE keys of a TCP daemon from the shared secret.
"""
