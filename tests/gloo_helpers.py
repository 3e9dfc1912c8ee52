"""One-machine gloo set-up for tests: a free port, and one process as a world of one."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def single_gloo_rank():
    """This process as rank 0 of a gloo world of one, for the body of the `with`."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
