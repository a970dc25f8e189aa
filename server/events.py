"""The registry's push notifications (distribution's envelope): which events name an image to index."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from chunkstore.oci import (
    DOCKER_CONFIG,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    OCI_CONFIG,
    InvalidReference,
    validate_digest,
    validate_repository,
)

from .errors import BadRequest

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
# Tags of the referrers tag schema: our own index pushes land there and must not be indexed as images.
_REFERRERS_TAG = re.compile(r"sha(256|512)-[0-9a-f]{64,128}")
MAX_EVENTS = 1000


@dataclass(frozen=True)
class PushedImage:
    repository: str
    digest: str
    media_type: str


def parse_events(body: bytes) -> tuple[list[PushedImage], int]:
    """(manifest pushes worth indexing, how many events were ignored); BadRequest if the envelope is malformed."""
    try:
        envelope = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"notification is not JSON: {exc}") from None
    events = envelope.get("events") if isinstance(envelope, dict) else None
    if not isinstance(events, list):
        raise BadRequest('notification must be a JSON object with an "events" list')
    if len(events) > MAX_EVENTS:
        raise BadRequest(f"notification holds {len(events)} events, at most {MAX_EVENTS} accepted")
    pushed: list[PushedImage] = []
    for event in events:
        image = _image_of(event)
        if image is not None and image not in pushed:
            pushed.append(image)
    return pushed, len(events) - len(pushed)


def _image_of(event: Any) -> PushedImage | None:
    if not isinstance(event, dict) or event.get("action") != "push":
        return None
    target = event.get("target")
    if not isinstance(target, dict):
        return None
    media_type = target.get("mediaType")
    if media_type not in IMAGE_MANIFEST_TYPES | INDEX_TYPES:
        return None  # blobs, and manifests of kinds we do not index
    tag = target.get("tag")
    if isinstance(tag, str) and _REFERRERS_TAG.fullmatch(tag):
        return None
    try:
        return PushedImage(validate_repository(target.get("repository")), validate_digest(target.get("digest")),
                           media_type)
    except InvalidReference:
        return None  # a registry sends valid names; anything else is not ours to act on


def is_artifact(manifest: dict[str, Any]) -> bool:
    """True for OCI artifacts (our own indexes, signatures, SBOMs): manifests that are not runnable images."""
    config_type = (manifest.get("config") or {}).get("mediaType")
    return bool(manifest.get("artifactType") or manifest.get("subject")) or config_type not in (OCI_CONFIG, DOCKER_CONFIG)
