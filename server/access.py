"""May this device pull this image? Asked of the registry with the device's own `Authorization` header,
before anything of the image is sent; answers are cached briefly per (credentials, repository)."""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

from client.registry import Forbidden, NotFound, RegistryClient, RegistryError, Unauthorized

from .errors import DeviceForbidden, DeviceUnauthorized, RegistryFailed, UnknownImage

_MAX_ENTRIES = 4096


class AccessChecker:
    def __init__(self, registry_url: str, ttl: float = 30.0) -> None:
        self.registry_url = registry_url
        self.ttl = ttl
        self._allowed: OrderedDict[tuple[bytes, str], float] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(authorization: str | None, repository: str) -> tuple[bytes, str]:
        # A hash, so the cache never holds a device's credentials.
        return hashlib.sha256((authorization or "").encode()).digest(), repository

    def _cached(self, key: tuple[bytes, str]) -> bool:
        with self._lock:
            expires = self._allowed.get(key)
            if expires is None:
                return False
            if expires < time.monotonic():
                del self._allowed[key]
                return False
            return True

    def _remember(self, key: tuple[bytes, str]) -> None:
        with self._lock:
            self._allowed[key] = time.monotonic() + self.ttl
            self._allowed.move_to_end(key)
            while len(self._allowed) > _MAX_ENTRIES:
                self._allowed.popitem(last=False)

    def check(self, authorization: str | None, repository: str, reference: str) -> None:
        """Raises DeviceUnauthorized/DeviceForbidden if the registry refuses these credentials for `repository`,
        UnknownImage if it does not know `reference` there. Blocking: call from a worker thread."""
        key = self._key(authorization, repository)
        if self._cached(key):
            return
        with RegistryClient(self.registry_url, authorization=authorization or None, retries=1) as device:
            try:
                device.head_manifest(repository, reference)
            except Unauthorized:
                raise DeviceUnauthorized(
                    f"the registry refused these credentials for {repository}: send the credentials you pull "
                    "with in the Authorization header (Basic or Bearer)") from None
            except Forbidden:
                raise DeviceForbidden(f"the registry does not let these credentials pull {repository}") from None
            except NotFound:
                raise UnknownImage(f"{repository}:{reference} is not in the registry") from None
            except RegistryError as exc:
                raise RegistryFailed(f"could not check access to {repository} with the registry: {exc}") from None
        self._remember(key)

    def allowed(self, authorization: str | None, repository: str, reference: str) -> bool:
        """check() as a yes/no, for optional things like have-images: any refusal or failure is a no."""
        try:
            self.check(authorization, repository, reference)
        except (DeviceUnauthorized, DeviceForbidden, UnknownImage, RegistryFailed):
            return False
        return True
