"""Test helpers for `bigtransfer serve`: a tiny saved model, and the server running in a thread on a free
loopback port (no torch import per server, so each starts in well under a second)."""

from __future__ import annotations

import contextlib
import io
import threading
import time

import httpx
import numpy as np
import torch
from PIL import Image

from bigtransfer.models import create_model, save_checkpoint
from bigtransfer.serving.app import build_predictor, create_app
from bigtransfer.serving.options import ServeOptions
from bigtransfer.serving.server import bind, url_of

TINY = "R[1,1,1,1]x0.5"
CLASSES = ["cat", "dog", "fox", "owl", "eel", "bee"]


def save_tiny_model(folder, classes=CLASSES, resolution=32, provenance=None):
    """A random-weight tiny model with class names, as a fine-tuned run would save it."""
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=len(classes), zero_head=False)
    return save_checkpoint(model, folder / "model.safetensors", class_names=list(classes), resolution=resolution,
                           provenance=provenance)


def png_bytes(seed: int = 0, size=(50, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def running_server(options: ServeOptions, *, load=build_predictor, wait_ready: bool = True):
    """Yields (base URL, app) of the server running in a thread; stops it on exit."""
    import uvicorn

    app = create_app(options, load=load)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = url_of(sock)
    try:
        _wait(lambda: server.started, "the server to start")
        if wait_ready:
            _wait(lambda: httpx.get(f"{url}/health").status_code == 200, "the model to be ready")
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)


def _wait(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.02)
