"""The server's request guard: an ASGI middleware in front of Gradio's routes.

    request bodies over MAX_BODY bytes (announced or streamed)      -> 413
      (an upload: MAX_UPLOAD and room for its form; the mask canvas's pictures: MAX_CANVAS_BODY)
    a call (queue/join, run/..., call/...) whose body is not JSON   -> 400
    ... that names no endpoint of the page (api_name or fn_index)   -> 404
    ... whose input list has the wrong length or type               -> 422
    ... that names a file by URL or by a path outside the uploads   -> 422

Everything else passes through unchanged. The replies are short JSON ({"detail": ...}) that quote at most
QUOTE characters of what was sent, so neither a client nor the server's log sees an oversized echo.
"""
from __future__ import annotations

import json
import os
import re

from ..photos.framing import MAX_BYTES
from .inputs import quote

MAX_BODY = 1 << 20               # bytes of one request body (a sampling request is well under 1 KB)
MAX_UPLOAD = MAX_BYTES           # bytes of an uploaded file (Gradio's max_file_size): a photo, as the CLI takes
UPLOAD_FORM = 1 << 16            # bytes of an upload's form around the file
MAX_CANVAS_BODY = 4 << 20        # the mask canvas's pictures, sent ahead of an edit (CANVAS_PX a side, as PNG)
CALLS = re.compile(r"/(?:queue/join|(?:run|api|call|call/v2)/(?P<name>[^/]+))/?$")
LARGER = re.compile(r"/(?P<route>upload|component_server)/?$")
FILE = "gradio.FileData"


class Refused(Exception):
    """A request the guard answers itself: HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def reply(send, status: int, message: str) -> None:
    """A short JSON error response: {"detail": message}."""
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def declared_length(scope) -> int | None:
    """The request's Content-Length (-1 when unreadable), or None when it sends none."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() and len(value) < 19 else -1
    return None


class RequestGuard:
    """Refuse oversized bodies, and calls of endpoints the page does not have, before Gradio sees them."""

    def __init__(self, app, demo=None, max_body: int = MAX_BODY, max_upload: int = MAX_UPLOAD + UPLOAD_FORM,
                 max_canvas: int = MAX_CANVAS_BODY):
        self.app, self.demo, self.max_body = app, demo, max_body
        self.limits = {"upload": max_upload, "component_server": max_canvas}

    def limit(self, path: str) -> int:
        """The most bytes a request body to `path` may have."""
        larger = LARGER.search(path)
        return self.limits[larger.group("route")] if larger else self.max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            length, most = declared_length(scope), self.limit(scope.get("path", ""))
            if length is not None and not 0 <= length <= most:
                raise Refused(413, f"request body too large: at most {most} bytes")
            call = CALLS.search(scope.get("path", "")) if scope.get("method") == "POST" else None
            if call is None or self.demo is None:
                return await self.app(scope, self._counted(receive, most), send)
            body = await self._read(receive)
            self.check_call(call.group("name"), body)
        except Refused as refused:
            return await reply(send, refused.status, str(refused))
        await self.app(scope, replay(body, receive), send)

    def _counted(self, receive, most: int):
        """`receive`, refusing (413) a streamed body once it passes `most` bytes."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > most:
                raise Refused(413, f"request body too large: at most {most} bytes")
            return message
        return counted

    async def _read(self, receive) -> bytes:
        chunks, more, counted = [], True, self._counted(receive, self.max_body)
        while more:
            message = await counted()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False) and message["type"] == "http.request"
        return b"".join(chunks)

    def check_call(self, api_name: str | None, body: bytes) -> None:
        """Refused(...) unless `body` calls one of the page's endpoints with a list of inputs of its length
        (and its file inputs hold uploaded files)."""
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise Refused(400, "the request body is not JSON") from None
        if not isinstance(payload, dict):
            raise Refused(422, "the request body must be a JSON object")
        fn = self.endpoint(payload.get("fn_index"), api_name)
        data = payload.get("data", [])
        if not isinstance(data, list):
            raise Refused(422, f"data must be a list of input values, got {quote(data)}")
        counts = {len(fn.inputs), sum(not block.skip_api for block in fn.inputs)}
        if len(data) not in counts:
            raise Refused(422, f"{fn.api_name or 'this endpoint'} takes {' or '.join(map(str, sorted(counts)))} "
                               f"input values, got {len(data)}")
        inputs = fn.inputs if len(data) == len(fn.inputs) else [block for block in fn.inputs if not block.skip_api]
        for block, value in zip(inputs, data):
            check_file_input(block, value)
            check_uploaded(block, value)

    def endpoint(self, fn_index, api_name: str | None):
        """The page's event that `fn_index` (when given) or `api_name` names, else Refused(404)."""
        fns = self.demo.fns
        if fn_index is not None:
            if isinstance(fn_index, int) and not isinstance(fn_index, bool) and fn_index in fns:
                return fns[fn_index]
            raise Refused(404, f"unknown endpoint: fn_index {quote(fn_index)}")
        for fn in fns.values():
            if api_name is not None and fn.api_name == api_name:
                return fn
        raise Refused(404, f"unknown endpoint: {quote(api_name)}")


def check_file_input(block, value) -> None:
    """Refused(422) unless a file input's value is null or what its component takes (Gradio's own data
    model, checked here so that a wrong shape is one line), with every file uploaded, none named by URL."""
    model = getattr(block, "data_model", None)
    if model is None or value is None:
        return
    name = getattr(block, "label", None) or type(block).__name__
    try:
        model.model_validate(value, context={"validate_meta": True})
    except ValueError:                                  # pydantic's ValidationError is a ValueError
        raise Refused(422, f"{name}: expected an uploaded file (a FileData object), got {quote(value)}") from None
    for path in file_paths(value):
        if not isinstance(path, str) or path.lower().startswith(("http://", "https://")):
            raise Refused(422, f"{name}: a file must be uploaded first (POST gradio_api/upload), not named by "
                               f"{quote(path)}")


def check_uploaded(block, value) -> None:
    """Refused(422) unless every file that `value` names (Gradio's FileData, in any input, file or not) is an
    upload: a file in Gradio's upload folder. Gradio makes the same check as it reads the inputs, but answers a
    refusal with a traceback in the server's log; refused here, it is one line to the client and none there."""
    paths = file_paths(value)
    if not paths:
        return
    from gradio.utils import get_upload_folder

    uploads = os.path.realpath(get_upload_folder())
    name = getattr(block, "label", None) or type(block).__name__
    for path in paths:
        where = uploaded_where(path, uploads) if isinstance(path, str) else None
        if where is None:
            raise Refused(422, f"{name}: a file must be uploaded first (POST gradio_api/upload), not named by "
                               f"{quote(path)}")
        if not os.path.isfile(where):
            raise Refused(422, f"{name}: the uploaded file {quote(path)} is no longer on the server: upload it "
                               f"again")


def uploaded_where(path: str, uploads: str) -> str | None:
    """`path` resolved (links followed) when it lies inside the folder `uploads` and Gradio would take it (not a
    dotfile under the working folder), else None."""
    try:
        named = os.path.abspath(path)
        real, cwd = os.path.realpath(named), os.path.realpath(os.getcwd())
        if os.path.commonpath([real, uploads]) != uploads or real == uploads:
            return None                                 # a URL ("https:/..." as a path) lands here too
        if os.path.basename(named).startswith(".") and os.path.commonpath([real, cwd]) == cwd:
            return None
    except (OSError, ValueError):                       # a NUL byte, a name too long
        return None
    return real


def file_paths(data) -> list:
    """The paths of the files (Gradio's FileData dicts) anywhere in a call's input values."""
    paths, todo = [], [data]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            if isinstance(value.get("meta"), dict) and value["meta"].get("_type") == FILE:
                paths.append(value.get("path"))
            todo += value.values()
        elif isinstance(value, list):
            todo += value
    return paths


def replay(body: bytes, receive):
    """A `receive` that hands over the body already read, then passes on the server's (a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed
