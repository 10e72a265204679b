"""
The client: finding a filespace's metadata server, connecting, and (later) the
filesystem core that ``lucid`` and ``lucid-mount`` share.

- :mod:`~lucidlink.client.config` — client settings (``client.ini``,
  environment, command line).
- :mod:`~lucidlink.client.backoff` — capped exponential backoff with full
  jitter, and logging a long run of failures at a falling rate.
- :mod:`~lucidlink.client.endpoint_cache` — the last answer of discovery per
  filespace, kept on disk across restarts.
- :mod:`~lucidlink.client.resolver` — asking the discovery instances, and
  connecting to a filespace's metadata server with the cache first.
"""
