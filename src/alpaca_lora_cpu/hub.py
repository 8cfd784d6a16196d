"""Is the Hugging Face Hub reachable? A quick TCP probe, so offline machines fall back in seconds, not minutes.

The Hub clients retry with back-off for ~25 s when DNS fails; probing first keeps the real Hub path for
online users and a fast, explicit offline path for everyone else. `HF_HUB_OFFLINE=1` counts as unreachable.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_reachable(timeout: float = 5.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
