"""Reading the uploaded image from a request, in memory, hashing it as it streams in.

Starlette's form parser spools uploads over 1 MiB to a temporary file; a DICOM upload
carries patient identifiers, so it is read here into memory only (its size is bounded by
``--max_upload_mb``, which the middleware enforces while the body streams). Accepted:
``multipart/form-data`` with one part named ``file`` (what browsers and ``curl -F`` send), or
the image as the raw body with ``Content-Type: application/dicom``, ``image/jpeg``,
``image/png`` or ``application/octet-stream`` (what scripts, ``curl --data-binary`` and DICOM routers
configured for a plain HTTP POST send). A DICOMweb STOW-RS client sends ``multipart/related``, which
is not accepted: such a client needs a STOW-RS endpoint in front that posts each instance here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from .errors import UploadTooLarge

FIELD = "file"
RAW_TYPES = (b"application/dicom", b"image/jpeg", b"image/png", b"application/octet-stream")


class NoFile(ValueError):
    """The request carries no image (answered 400)."""


@dataclass
class Upload:
    data: bytes
    sha256: str


class _FilePart:
    """Callbacks for python-multipart that keep the ``file`` part's bytes and ignore other parts."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.digest = hashlib.sha256()
        self.found = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._in_file = False

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._in_file = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._in_file = options.get(b"name") == FIELD.encode()
        if self._in_file:
            self.found += 1
            if self.found > 1:
                raise NoFile(f"send one image per request: the form has more than one '{FIELD}' field")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            chunk = data[start:end]
            self.buffer += chunk
            self.digest.update(chunk)

    def callbacks(self) -> dict:
        return {name: getattr(self, name) for name in ("on_part_begin", "on_header_field", "on_header_value",
                                                       "on_header_end", "on_headers_finished", "on_part_data")}


async def read_upload(request: Request, max_bytes: int | None = None) -> Upload:
    """The image in ``request`` (see the module docstring) and its SHA-256.

    Raises:
        NoFile: no ``file`` field, no body, a malformed multipart body or another content type.
        UploadTooLarge: the image itself is over ``max_bytes`` (the body limit leaves room for a form around it).
    """
    upload = await _read(request)
    if max_bytes is not None and len(upload.data) > max_bytes:
        raise UploadTooLarge(max_bytes)
    return upload


async def _read(request: Request) -> Upload:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise NoFile("multipart/form-data body without a boundary")
        part = _FilePart()
        parser = MultipartParser(boundary, part.callbacks())
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError as exc:
            raise NoFile(f"malformed multipart/form-data body ({exc})") from exc
        if not part.found:
            raise NoFile(f"no file in the request: send the image as the multipart form field '{FIELD}'")
        return Upload(bytes(part.buffer), part.digest.hexdigest())
    if content_type in RAW_TYPES:
        digest, chunks = hashlib.sha256(), []
        async for chunk in request.stream():
            digest.update(chunk)
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data:
            raise NoFile(f"empty {content_type.decode()} body: send the image as the body or as the "
                         f"multipart form field '{FIELD}'")
        return Upload(data, digest.hexdigest())
    shown = content_type.decode("latin-1") or "none"
    raise NoFile(f"no file in the request (Content-Type {shown}): send the image as the multipart form "
                 f"field '{FIELD}', or as the body with Content-Type application/dicom, image/jpeg or image/png")
