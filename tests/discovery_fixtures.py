"""
A discovery configuration in a scratch folder, for the tap, web and
announcer tests: a private CA, the discovery certificate, a registration
secret file, a static map and the ini file that names them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lucidlink.tls import init_ca, issue_certificate

DISCOVERY_IDENTITY = "discovery.test.lucid"
KEY_ID = "2026-11"
SECRET = bytes(range(32))
STATIC_MAP = """\
[filespace static-fs]
endpoints = tcp:127.0.0.1:7999
identity = meta.static-fs.lucid
ttl = 120
"""


def write_config(directory: Path, **overrides: Any) -> Path:
    """Write a working discovery.ini (listening on loopback port 0) into ``directory``; return its path.

    ``overrides`` replace keys of the [discovery] section; a value of None drops the key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "discovery.pem").exists():
        init_ca(directory / "ca")
        issue_certificate(directory / "ca", [DISCOVERY_IDENTITY, "127.0.0.1"], directory / "discovery")
    secret_file = directory / "registration-secret"
    secret_file.write_text(f"{KEY_ID}:{SECRET.hex()}\n")
    os.chmod(secret_file, 0o600)
    (directory / "static-map.ini").write_text(STATIC_MAP)
    keys: dict[str, Any] = {
        "listen": "tcp:0:interface=127.0.0.1",
        "certificate": "discovery.pem",
        "private_key": "discovery.key",
        "registration_secret_current_file": "registration-secret",
        "static_map": "static-map.ini",
        "entry_ttl": "15",
        "heartbeat_interval": "5",
        "metrics_listen": "tcp:0:interface=127.0.0.1",
    }
    keys.update(overrides)
    lines = ["[discovery]"] + [f"{key} = {value}" for key, value in keys.items() if value is not None]
    path = directory / "discovery.ini"
    path.write_text("\n".join(lines) + "\n")
    return path
