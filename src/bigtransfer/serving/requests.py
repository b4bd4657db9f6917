"""Reading a request: its body under a size limit, its images (multipart or JSON base64), top_k.

Everything a client can get wrong becomes an `ApiError`: a 4xx status, a kind (the metrics' label)
and one line saying what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from ..data.images import IMAGE_ERRORS, ImageTooLarge, load_rgb

MULTIPART = "multipart/form-data"
JSON = "application/json"
FIELD = "image"


@dataclass
class ApiError(Exception):
    """A request refused: HTTP status, kind of error, one line for the client."""

    status: int
    kind: str
    message: str
    headers: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


@dataclass
class Upload:
    """One image as the client sent it: a name to answer with, and its encoded bytes."""

    name: str
    data: bytes


class BodyTooLarge(Exception):
    """Raised from `receive` once a body passes the limit, so no more of it is read."""


def too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the request body is larger than the limit of {limit / 2**20:g} MB "
                                      "(--max-upload-mb)")


class BodyLimit:
    """Refuses a body over `limit` bytes: at once from its Content-Length, else while it streams in."""

    def __init__(self, app, limit: int, on_refused=None):
        self.app, self.limit = app, limit
        self.on_refused = on_refused or (lambda: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > self.limit):
            self.on_refused()
            await _send_error(send, too_large(self.limit))
            return
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge()
            return message

        await self.app(scope, counting_receive, send)


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps({"error": error.message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- the images of a request
async def read_uploads(request: Request, *, max_images: int, limit: int) -> list[Upload]:
    """The images a request carries: multipart field `image` (repeatable) or JSON {"images": [base64]}."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.headers.get("content-length") == "0":
        raise ApiError(400, "empty_body", "the request body is empty")
    try:
        if media_type == MULTIPART:
            uploads = await _multipart(request, max_images)
        elif media_type == JSON:
            uploads = _json_images(await request.body(), max_images)
        else:
            shown = media_type or "none"
            raise ApiError(415, "unsupported_media_type", f"Content-Type {shown!r} is not accepted: send "
                           f"{MULTIPART} with field '{FIELD}' or {JSON} with {{\"images\": [base64, ...]}}")
    except BodyTooLarge:
        raise too_large(limit) from None
    except ClientDisconnect:  # nobody will read the answer; say so in the metrics, not in a traceback
        raise ApiError(400, "client_disconnected", "the client went away before sending the whole body") from None
    if not uploads:
        raise ApiError(400, "no_image", f"no image in the request: send {MULTIPART} field '{FIELD}' or "
                                        f"{JSON} {{\"images\": [base64, ...]}}")
    return uploads


async def _multipart(request: Request, max_images: int) -> list[Upload]:
    try:
        form = await request.form(max_files=max_images, max_fields=max_images + 16)
    except HTTPException as err:  # Starlette's word for a malformed multipart body
        raise ApiError(400, "bad_multipart", f"the multipart body could not be read: {_one_line(err.detail)}") \
            from None
    try:
        uploads = []
        for i, item in enumerate(form.getlist(FIELD)):
            if not isinstance(item, UploadFile):
                raise ApiError(400, "bad_multipart", f"field '{FIELD}' number {i + 1} is text, not a file")
            uploads.append(Upload(_one_line(item.filename or f"{FIELD}[{i}]")[:200], await item.read()))
        return uploads
    finally:
        await form.close()


def _json_images(body: bytes, max_images: int) -> list[Upload]:
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", "the body is not valid JSON") from None
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise ApiError(400, "bad_json", 'expected a JSON object {"images": ["<base64>", ...]}')
    if len(images) > max_images:
        raise ApiError(400, "too_many_images", f"{len(images)} images in one request; at most {max_images} "
                                               "(--max-images)")
    return [Upload(f"images[{i}]", _base64(text, i)) for i, text in enumerate(images)]


def _base64(text: str, index: int) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL, as a browser's FileReader makes
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"images[{index}] is not valid base64") from None


def decode(upload: Upload, transform):
    """The model's input tensor for one upload, decoded under the pixel limit as `predict` decodes files."""
    if not upload.data:
        raise ApiError(400, "empty_image", f"{upload.name}: the image is empty (0 bytes)")
    try:
        return transform(load_rgb(upload.data))
    except ImageTooLarge as err:
        raise ApiError(413, "too_many_pixels", f"{upload.name}: {err}") from None
    except Image.DecompressionBombError:  # Pillow's own limit, met before ours when set lower
        raise ApiError(413, "too_many_pixels", f"{upload.name}: the image declares more pixels than the "
                                               "limit (--max-pixels)") from None
    except IMAGE_ERRORS:
        raise ApiError(400, "not_an_image", f"{upload.name}: not a readable image (or a truncated one)") from None


def parse_top_k(text: str | None, num_classes: int) -> int:
    """`?top_k=`: a whole number from 1 to the number of classes (default 5, or all when fewer)."""
    if text is None:
        return min(5, num_classes)
    if not re.fullmatch(r"[0-9]{1,9}", text) or not 1 <= int(text) <= num_classes:
        raise ApiError(400, "bad_top_k", f"top_k must be a whole number from 1 to {num_classes} "
                                         f"(the model's classes), got {text[:40]!r}")
    return int(text)


def _one_line(text) -> str:
    return " ".join(str(text).split())
