"""What stands between the network and the model: who may call, how much they may send, what an image may be.

A1111's server is open to anyone on --listen, fetches image URLs server-side, and bounds no size. Here: a
non-loopback bind needs credentials (checked in constant time), the body and every image are bounded before
they are decoded, images come only as base64 (never fetched), and each refusal is a 4xx that says which field
broke which limit.
"""
from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import secrets
from dataclasses import dataclass

from PIL import Image

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


class RequestError(ValueError):
    """A request the server refuses: `status` 422 (a value out of bounds or malformed) or 400 (asks for
    something this server does not have); the message names the field."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Bounds on one request; each is a server flag (`diffusion-core serve --help`)."""

    max_body_bytes: int = 64 * 2**20        # the whole request body
    max_image_bytes: int = 32 * 2**20       # each image, decoded from base64
    max_image_pixels: int = 4096 * 4096     # each input image's width × height, read before it is decoded
    max_pixels: int = 2048 * 2048           # the output's width × height
    max_steps: int = 150                    # A1111's UI slider maximum
    max_images: int = 16                    # batch_size × n_iter

    def check(self, width: int, height: int, steps: int, batch_size: int, n_iter: int) -> None:
        if not 1 <= steps <= self.max_steps:
            raise RequestError(f"steps must be between 1 and {self.max_steps} (this server's limit), got {steps}")
        if width < 8 or height < 8 or width * height > self.max_pixels:
            raise RequestError(f"width × height must be at most {self.max_pixels} pixels (this server's limit) "
                               f"with each side >= 8, got {width} × {height}")
        if batch_size < 1 or n_iter < 1 or batch_size * n_iter > self.max_images:
            raise RequestError(f"batch_size × n_iter must be between 1 and {self.max_images} images (this "
                               f"server's limit), got {batch_size} × {n_iter}")


def decode_image(field: str, text: str, limits: Limits) -> Image.Image:
    """An image sent as base64 or a data URL, checked against the limits before its pixels are decoded."""
    if not isinstance(text, str) or not text:
        raise RequestError(f"{field}: expected a base64-encoded image")
    if text.startswith(("http://", "https://", "file:", "ftp://")):
        raise RequestError(f"{field}: images are never fetched from URLs (the server would reach whatever the "
                           f"URL names); send the image itself, base64-encoded", status=400)
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(f"{field}: a data URL must be base64 (data:image/png;base64,...)")
    if len(text) * 3 // 4 > limits.max_image_bytes:
        raise RequestError(f"{field}: the image must be at most {limits.max_image_bytes} bytes (this server's "
                           f"limit), got about {len(text) * 3 // 4}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Exception:  # noqa: BLE001  PIL raises several kinds for bytes that are not an image
        raise RequestError(f"{field}: not an image in one of the formats {IMAGE_FORMATS}") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise RequestError(f"{field}: the image must be at most {limits.max_image_pixels} pixels (this server's "
                           f"limit), got {width} × {height}")
    try:
        image.load()
    except Exception:  # noqa: BLE001  truncated or corrupt data
        raise RequestError(f"{field}: the image data is truncated or corrupt") from None
    return image


def parse_credentials(text: str) -> list[tuple[str, str]]:
    """--api-auth USER:PASS[,USER2:PASS2] -> [(user, password), ...]."""
    pairs = [item.partition(":") for item in text.split(",")]
    if not pairs or any(not user or not sep or not password for user, sep, password in pairs):
        raise ValueError("--api-auth takes USER:PASS[,USER2:PASS2], each user and password non-empty")
    return [(user, password) for user, _, password in pairs]


def credentials_match(user: str, password: str, allowed: list[tuple[str, str]]) -> bool:
    """Whether (user, password) is one of `allowed`, compared in constant time: every pair is compared, and
    secrets.compare_digest takes as long wherever the strings first differ (no timing tells a prefix)."""
    found = False
    for allowed_user, allowed_password in allowed:
        same_user = secrets.compare_digest(user.encode(), allowed_user.encode())
        same_password = secrets.compare_digest(password.encode(), allowed_password.encode())
        found |= same_user & same_password
    return found


def check_bind(host: str, credentials: list[tuple[str, str]] | None) -> None:
    """Refuse to listen beyond this machine without credentials: anyone who reaches the port could generate."""
    if credentials or _is_loopback(host):
        return
    raise ValueError(f"--host {host} would accept connections from other machines, and without --api-auth "
                     f"anyone who reaches the port could use the server: add --api-auth USER:PASS, or bind "
                     f"127.0.0.1")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is refused (413) by its Content-Length, or once that many bytes
    of a chunked body have arrived; the app then reads the body from memory, never more than the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(send)
        replayed = False

        async def replay():  # the body once, then the client's own messages (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        body = (b'{"error": "RequestTooLarge", "detail": "the request body must be at most %d bytes (this '
                b'server\'s limit)"}' % self.max_bytes)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
