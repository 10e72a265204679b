"""``twistd lucid-discovery``: which metadata server serves a filespace."""

from twisted.application.service import ServiceMaker

lucid_discovery = ServiceMaker(
    "lucidlink discovery",
    "lucidlink.discovery.tap",
    "Tell clients which metadata server serves each filespace.",
    "lucid-discovery",
)
