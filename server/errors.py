"""The server's errors: exceptions carrying an HTTP status and a code, mapped once to JSON `{"error": {...}}`."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from chunkstore.bloom import BloomFormatError
from chunkstore.index import IndexFormatError
from chunkstore.oci import DigestMismatch, InvalidReference
from chunkstore.wire import LimitExceeded, ProtocolError, UnsupportedVersion
from client.registry import NotFound, PlatformNotFound, RegistryError


class ApiError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 details: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}  # more keys of the JSON error, for machines (e.g. "versions")
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class DeviceUnauthorized(ApiError):
    status, code = 401, "unauthorized"


class DeviceForbidden(ApiError):
    status, code = 403, "forbidden"


class UnknownImage(ApiError):
    status, code = 404, "not_found"


class TooLarge(ApiError):
    status, code = 413, "too_large"


class RegistryFailed(ApiError):
    status, code = 502, "registry_error"


class ServerBusy(ApiError):
    status, code = 503, "busy"


def as_api_error(exc: Exception) -> ApiError:
    """What an exception means for the device. Registry errors seen here came from the SERVER's own
    credentials (the device's are checked in access.py), so a 401 from the registry is the server's fault: 502."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, LimitExceeded):
        return TooLarge(str(exc))
    if isinstance(exc, UnsupportedVersion):
        # 400 as before, so devices that predate the code still read it as a refusal (and parse the message).
        return BadRequest(str(exc), code="unsupported_version", details={"versions": list(exc.versions)})
    if isinstance(exc, (ProtocolError, InvalidReference, BloomFormatError)):
        return BadRequest(str(exc))
    if isinstance(exc, PlatformNotFound):
        return UnknownImage(str(exc), code="platform_not_found")
    if isinstance(exc, NotFound):
        return UnknownImage(f"not found in the registry: {exc}")
    if isinstance(exc, (RegistryError, DigestMismatch, IndexFormatError)):
        return RegistryFailed(f"the registry failed: {exc}")
    return ApiError(f"internal error: {type(exc).__name__}: {str(exc)[:200]}")


def error_body(error: ApiError) -> dict:
    return {"error": {"code": error.code, "message": error.message, **error.details}}


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The one place where exceptions become HTTP answers."""
    error = as_api_error(exc)
    headers = {"Retry-After": "5"} if isinstance(error, ServerBusy) else None
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)


HANDLED = (ApiError, ProtocolError, InvalidReference, BloomFormatError, RegistryError, DigestMismatch,
           IndexFormatError)
