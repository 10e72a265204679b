"""
The client: finding a filespace's metadata server, connecting, logging in,
and the filesystem core that ``lucid`` and ``lucid-mount`` share.

- :mod:`~lucidlink.client.config` — client settings (``client.ini``,
  environment, command line).
- :mod:`~lucidlink.client.backoff` — capped exponential backoff with full
  jitter, and logging a long run of failures at a falling rate.
- :mod:`~lucidlink.client.endpoint_cache` — the last answer of discovery per
  filespace, kept on disk across restarts.
- :mod:`~lucidlink.client.resolver` — asking the discovery instances, and
  connecting to a filespace's metadata server with the cache first.
- :mod:`~lucidlink.client.session` — a logged-in session that retries and
  reconnects; initialising a filespace; users and key export.
- :mod:`~lucidlink.client.filespace` — files and directories by path and by
  inode, file handles with chunk math, buffered writes and rebasing commits.
- :mod:`~lucidlink.client.interface` — :class:`IFilespaceInodes`, what a
  FUSE layer sees.
"""
