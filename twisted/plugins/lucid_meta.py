"""``twistd lucid-meta``: the metadata server of one filespace."""

from twisted.application.service import ServiceMaker

lucid_meta = ServiceMaker(
    "lucidlink metadata server",
    "lucidlink.meta.tap",
    "Serve the metadata of one filespace.",
    "lucid-meta",
)
