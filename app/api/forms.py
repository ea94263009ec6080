"""Form bodies (multipart uploads, URL-encoded forms) read strictly: UTF-8, and complete.

Starlette's form parsers are lenient where this API must not be:
- text that is not UTF-8 (a field's value or name, a file's name) is decoded as Latin-1, so
  `name=Rex\\xff` became the concept "Rexÿ"; a URL-encoded form decodes `%FF` to U+FFFD and
  raw UTF-8 bytes as Latin-1 ("café" became "cafÃ©");
- a multipart body that ends before its closing boundary (the client was cut off, a proxy
  truncated it) is taken as whatever parts were complete: the request then failed for a
  missing field (422 "files: Field required") or went on with the photos that made it.

Routers whose routes take forms use `FormRoute` (`APIRouter(route_class=FormRoute)`): their
requests parse forms with the parsers below, which refuse such text (`InvalidUtf8Form`, answered
422 `invalid_utf8` by app/api/errors.py) and such bodies (400 `bad_request`). Nothing else of
Starlette's parsing changes: limits, spooled files, the form's lifetime.

The parsers are subclasses of Starlette's and use some of their private state (the current
part, the parsed items, `Request._get_form`): Starlette has no hook for this. A Starlette
release that changes them fails tests/api/test_multipart.py, which checks every rule above.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser


class InvalidUtf8Form(MultiPartException):
    """A form's field name, text value or file name that is not UTF-8."""


class IncompleteMultipart(MultiPartException):
    """A multipart body without its closing boundary."""


def _utf8(raw: bytes | bytearray, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidUtf8Form(f"{what} is not valid UTF-8") from None


class StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, with every name and text value UTF-8 or an error, and the
    body complete (its closing boundary reached) or an error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts = 0
        self._complete = False

    # Starlette decodes names and text with the `charset` the Content-Type names (Latin-1 for
    # `charset=latin-1`, and for a charset it does not know): this API's forms are UTF-8, and
    # the bytes were checked to be (above), whatever the client declares.
    @property
    def _charset(self) -> str:
        return "utf-8"

    @_charset.setter
    def _charset(self, _declared: str) -> None:
        pass

    def on_part_begin(self) -> None:
        self._parts += 1
        super().on_part_begin()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._current_part.content_disposition)
        name = options.get(b"name")
        if name is not None:
            name_text = _utf8(name, f"the name of the form's part {self._parts}")
            if (filename := options.get(b"filename")) is not None:
                _utf8(filename, f"the file name of the form's part {self._parts} ({name_text!r})")
        super().on_headers_finished()

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            _utf8(part.data, f"the form field {part.field_name!r}")
        super().on_part_end()

    def on_end(self) -> None:
        self._complete = True
        super().on_end()

    async def parse(self) -> FormData:
        form = await super().parse()
        if not self._complete:
            for file in self._files_to_close_on_error:
                file.close()
            raise IncompleteMultipart(
                "the multipart body is incomplete: it ends before its closing boundary (the "
                "upload was cut off, or the body uses another boundary than its Content-Type "
                "names); nothing of it was used"
            )
        return form


class StrictFormParser(FormParser):
    """Starlette's URL-encoded form parser, with names and values percent-decoded as UTF-8 (raw
    bytes included), or an error."""

    def on_field_end(self) -> None:
        self._current_fields += 1
        if self._current_fields > self.max_fields:
            raise MultiPartException(
                f"Too many fields. Maximum number of fields is {self.max_fields}."
            )
        name = _utf8(unquote_to_bytes(bytes(self._field_name).replace(b"+", b" ")), "a form name")
        value = unquote_to_bytes(bytes(self._field_value).replace(b"+", b" "))
        self._items.append((name, _utf8(value, f"the form field {name!r}")))


class StrictFormRequest(Request):
    """A request whose form is parsed by the strict parsers above."""

    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        if self._form is None:
            content_type, params = parse_options_header(self.headers.get("Content-Type"))
            try:
                if content_type == b"multipart/form-data":
                    if not params.get(b"boundary"):
                        raise MultiPartException(
                            "the multipart body cannot be read: its Content-Type names no "
                            "boundary (multipart/form-data; boundary=...)"
                        )
                    async with aclosing(self.stream()) as stream:
                        self._form = await StrictMultiPartParser(
                            self.headers,
                            stream,
                            max_files=max_files,
                            max_fields=max_fields,
                            max_part_size=max_part_size,
                        ).parse()
                elif content_type == b"application/x-www-form-urlencoded":
                    async with aclosing(self.stream()) as stream:
                        self._form = await StrictFormParser(
                            self.headers, stream, max_fields=max_fields, max_part_size=max_part_size
                        ).parse()
            except MultiPartException as exc:
                raise StarletteHTTPException(400, detail=_message(exc)) from exc
        return await super()._get_form(
            max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )


def _message(exc: MultiPartException) -> str:
    """Starlette's "Invalid multipart data." says nothing; the parser's own error says where."""
    if exc.__cause__ is not None and exc.message == "Invalid multipart data.":
        return f"the multipart body is malformed: {exc.__cause__}"
    return exc.message


class FormRoute(APIRoute):
    """A route whose requests read their forms strictly (`StrictFormRequest`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_forms(request: Request) -> Response:
            return await handler(StrictFormRequest(request.scope, request.receive))

        return strict_forms
