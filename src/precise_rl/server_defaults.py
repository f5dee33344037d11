"""The reward server's defaults: its port, the token's environment variable and the request limits.

They live apart from :mod:`precise_rl.rewards.server` and :mod:`precise_rl.rewards.protocol`, which
import torch, so that ``precise-rl serve-reward --help`` can show them without importing it.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_BODIES_FACTOR",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_DECODING",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_JSON_VALUES",
    "DEFAULT_MAX_MB",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "DEFAULT_PORT",
    "DEFAULT_RECEIVE_TIMEOUT_S",
    "TOKEN_ENV",
]

#: the environment variable a server and its clients read the bearer token from
TOKEN_ENV = "PRECISE_RL_REWARD_TOKEN"
DEFAULT_PORT = 18085
DEFAULT_MAX_MB = 64.0
#: images per request (the client sends 16 by default and splits a request answered 413)
DEFAULT_MAX_IMAGES = 1024
#: pixels of one image: 4096 x 4096
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
#: pixels of one request's images together: 32 images of 1024 x 1024 (about 0.4 GB as float32 RGB)
DEFAULT_MAX_REQUEST_PIXELS = 32 * 1024 * 1024
#: frames of one video (Wan 2.1 makes 81, HunyuanVideo 1.5 121); its pixels count in the request's pixels above
DEFAULT_MAX_FRAMES = 512
#: requests decoded or scored at the same time (each holds at most the pixels above)
DEFAULT_MAX_DECODING = 2
#: JSON values of one body (arrays, objects, keys, scalars), counted before parsing: some 40 MB parsed
DEFAULT_MAX_JSON_VALUES = 250_000
#: bytes of request bodies held at once (received or being received, not yet decoded), in request bodies
DEFAULT_BODIES_FACTOR = 4
#: seconds a request (headers and body) may take to arrive
DEFAULT_RECEIVE_TIMEOUT_S = 60.0
#: connections open at once (each holds a file descriptor)
DEFAULT_MAX_CONNECTIONS = 256
