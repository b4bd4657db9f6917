"""What `bigtransfer serve` is told: one dataclass, checked before anything is loaded."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import BigTransferError

MAX_KEY_FILE_BYTES = 4096  # an API key is a line of text; anything bigger is the wrong file


@dataclass
class ServeOptions:
    """How to serve one model: where to listen, how to batch, what to refuse."""

    model: str  # run directory, .safetensors, released name or authors' .npz
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000  # 0: any free port (printed when listening)
    device: str = "auto"
    backend: str = "auto"  # auto | torch | onnxruntime (see bigtransfer.inference.backends)
    precision: str = "auto"  # auto | fp32 | bf16
    resolution: int | None = None  # default: from the model's metadata
    max_batch: int = 16  # images run through the model at once
    batch_timeout_ms: float = 10.0  # how long the first image of a batch waits for company
    workers: int = 1  # batches computed at the same time (threads sharing one model)
    max_queue: int = 128  # requests admitted at once (reading, waiting, computing); beyond: 503
    max_upload_mb: float = 20.0  # a request body larger than this is refused while it is read
    max_images: int = 16  # images in one request
    read_timeout_s: float = 30.0  # a body still arriving after this is refused (a slow client holds a place)
    api_key_file: Path | None = None  # when set, /predict /embed /metrics need this key
    grace_s: float = 30.0  # on SIGTERM, how long requests in flight may take to finish
    access_log: bool = False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def check_options(options: ServeOptions) -> None:
    """Refuse impossible settings with a one-line error naming the flag; needs no model."""
    if not 0 <= options.port <= 65535:
        raise BigTransferError(f"--port must be from 0 to 65535, got {options.port}")
    whole = {"--max-batch": options.max_batch, "--workers": options.workers, "--max-queue": options.max_queue,
             "--max-images": options.max_images}
    for flag, value in whole.items():
        if value < 1:
            raise BigTransferError(f"{flag} must be at least 1, got {value}")
    if options.resolution is not None and options.resolution < 8:
        raise BigTransferError(f"--resolution must be at least 8 pixels, got {options.resolution}")
    if not options.batch_timeout_ms >= 0:
        raise BigTransferError(f"--batch-timeout-ms must be 0 or more, got {options.batch_timeout_ms}")
    if not options.max_upload_mb > 0:
        raise BigTransferError(f"--max-upload-mb must be more than 0, got {options.max_upload_mb}")
    if not options.read_timeout_s > 0:
        raise BigTransferError(f"--read-timeout must be more than 0 seconds, got {options.read_timeout_s}")
    if not options.grace_s >= 0:
        raise BigTransferError(f"--grace must be 0 or more seconds, got {options.grace_s}")
    if options.api_key_file is not None:
        read_api_key(options.api_key_file)


def read_api_key(path: Path) -> bytes:
    """The key in `path`: a regular file (not a link, FIFO or device) of one short line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise BigTransferError(f"--api-key-file {path}: cannot open it ({err.strerror}; a symbolic link is "
                               "refused)") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BigTransferError(f"--api-key-file {path}: not a regular file")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise BigTransferError(f"--api-key-file {path}: {info.st_size} bytes is too long for a key "
                                   f"(at most {MAX_KEY_FILE_BYTES})")
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    key = data.strip()
    if not key:
        raise BigTransferError(f"--api-key-file {path}: the file is empty")
    if b"\n" in key or b"\r" in key:
        raise BigTransferError(f"--api-key-file {path}: the key must be a single line")
    if not all(0x21 <= c <= 0x7e for c in key):
        raise BigTransferError(f"--api-key-file {path}: the key must be printable ASCII without spaces "
                               "(it travels in an HTTP header)")
    return key
