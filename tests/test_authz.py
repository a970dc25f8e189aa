"""Authorization gaps that tests/test_server_auth.py leaves open: a device allowed on repository A must learn
nothing of repository B — not through B's manifest digest named under A, not through have_images, not through
the store's deduplication (a Bloom filter, repair ids), and not through a chunk index it pushes itself to a
repository it may write, listing chunk ids of B. Real token-auth registry (per-repository grants), real server.
The analysis is in docs/RELIABILITY.md."""
from __future__ import annotations

import io
import os
import random
from array import array
from collections.abc import Iterator

import httpx
import pytest

from chunkstore.bloom import BloomFilter
from chunkstore.index import ChunkList, ImageIndex, LayerIndex, decode_index, index_layer
from chunkstore.oci import OCI_EMPTY_DATA, OCI_EMPTY_DIGEST, sha256_digest
from chunkstore.wire import ChunksRequest, SyncRequest
from client.registry import Manifest
from helpers import Registry, build_image, push_image, real_files, start_registry
from server.indexer import artifact_manifest
from server_process import Answer, ServerProcess, assert_error, post
from test_server_auth import TokenService, basic

SECRET = "tenant-b/secret"   # the device may not pull this
OWN = "tenant-a/app"         # the device may pull this
WRITABLE = "tenant-a/evil"   # the device may push here (a tenant's own repository)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    workdir = tmp_path_factory.mktemp("authz")
    tokens = TokenService(workdir, {
        "server": ("server-pw", {"*": ["pull", "push"]}),
        "device": ("device-pw", {OWN: ["pull"], WRITABLE: ["pull", "push"]}),
    })
    registry = start_registry(workdir, auth=tokens.auth_config())
    registry.users.update({"server": "server-pw", "device": "device-pw"})
    rng = random.Random(1)
    shared = real_files(200_000)
    secret_files = {"secret/key.bin": rng.randbytes(300_000)}
    # A shares some files with B (the base), B has content of its own (the secret).
    own = push_image(build_image(workdir / "a", [shared]), "v1", registry, OWN, creds=registry.creds("server"))
    secret = push_image(build_image(workdir / "b", [shared, secret_files]), "v1", registry, SECRET,
                        creds=registry.creds("server"))
    evil = push_image(build_image(workdir / "e", [real_files(50_000, skip=400)]), "v1", registry, WRITABLE,
                      creds=registry.creds("device"))
    with ServerProcess(registry.url, store=workdir / "server-store", user="server", password="server-pw") as server:
        yield {"registry": registry, "server": server, "own": own, "secret": secret, "evil": evil,
               "device": basic("device", "device-pw"), "server_auth": basic("server", "server-pw")}
    registry.stop()
    tokens.stop()


def secret_only_ids(world: dict) -> tuple[set[bytes], dict[bytes, int]]:
    """Chunk ids (and lengths) of B that A lacks, as the server indexed them: what an attacker wants to have."""
    server: ServerProcess = world["server"]
    secret = Answer(post(server.url, "/v1/sync", SyncRequest(SECRET, world["secret"]).encode(), world["server_auth"]))
    own = Answer(post(server.url, "/v1/sync", SyncRequest(OWN, world["own"]).encode(), world["server_auth"]))
    assert secret.header and own.header
    lengths = {cid: n for layer in decode_index(secret.header["index"]).layers for cid, n in layer.all_chunks()}
    only = set(lengths) - decode_index(own.header["index"]).chunk_ids()
    assert only
    return only, lengths


def test_b_digest_named_under_a_gets_nothing(world: dict) -> None:
    server, device = world["server"], world["device"]
    only, _ = secret_only_ids(world)
    cid = sorted(only)[0]
    # The device's access to A is checked (and cached) first, then it names B's image under A.
    assert Answer(post(server.url, "/v1/sync", SyncRequest(OWN, "v1").encode(), device)).end is not None
    answers = [
        post(server.url, "/v1/sync", SyncRequest(OWN, world["secret"]).encode(), device),
        post(server.url, "/v1/chunks", ChunksRequest(OWN, world["secret"], cid).encode(), device),
        httpx.get(f"{server.url}/v1/chunks/{cid.hex()}?repository={OWN}&manifest={world['secret']}",
                  headers={"Authorization": device}),
    ]
    for response in answers:
        assert_error(response, 404)
        assert cid.hex() not in response.text or "not in" in response.text


def test_have_images_naming_b_under_a_changes_nothing(world: dict) -> None:
    server, device = world["server"], world["device"]
    plain = Answer(post(server.url, "/v1/sync", SyncRequest(OWN, "v1").encode(), device))
    # B's image under its own name (not allowed) and under A's (allowed repository, but not an image of A).
    for have in ([(SECRET, world["secret"])], [(OWN, world["secret"])], [(OWN, world["secret"]), (SECRET, world["secret"])]):
        probe = Answer(post(server.url, "/v1/sync", SyncRequest(OWN, "v1", have_images=have).encode(), device))
        assert probe.ids == plain.ids and probe.end == plain.end


def test_repair_ids_of_b_are_refused_like_random_ids(world: dict) -> None:
    """Asking A's image for B's chunk ids answers exactly as for ids that exist nowhere: no membership oracle."""
    server, device = world["server"], world["device"]
    only, _ = secret_only_ids(world)
    real_ids = sorted(only)[:3]
    random_ids = [os.urandom(32) for _ in real_ids]
    answers = [post(server.url, "/v1/chunks", ChunksRequest(OWN, world["own"], b"".join(ids)).encode(), device)
               for ids in (real_ids, random_ids)]
    errors = [assert_error(a, 400, "not chunks of") for a in answers]
    assert errors[0] == errors[1]
    for cid in real_ids:
        response = httpx.get(f"{server.url}/v1/chunks/{cid.hex()}?repository={OWN}&manifest={world['own']}",
                             headers={"Authorization": device})
        assert_error(response, 404)
        assert response.json()["error"]["message"].replace(cid.hex(), "ID") == \
            f"chunk ID is not in {OWN}@{world['own']}"


def test_bloom_and_dedup_reveal_nothing_of_b(world: dict) -> None:
    """What is sent for A depends only on A's index and what the device says it has: B being indexed on the
    server (sharing A's base) or the device's filter holding B's ids changes nothing."""
    server, device = world["server"], world["device"]
    only, _ = secret_only_ids(world)   # B is indexed now: its chunks sit in the server's store
    plain = Answer(post(server.url, "/v1/sync", SyncRequest(OWN, "v1").encode(), device))
    bloom = BloomFilter.build(b"".join(sorted(only)), fp_rate=1e-6)
    probe = Answer(post(server.url, "/v1/sync", SyncRequest(OWN, "v1", bloom=bloom).encode(), device))
    assert probe.ids == plain.ids and probe.end == plain.end
    assert not set(probe.ids) & only


def forged_index(registry: Registry, digest: str, victim_ids: list[bytes], lengths: dict[bytes, int]) -> bytes:
    """An index for the attacker's own image whose only layer claims B's chunks: layer digest and manifest
    digest are right (the server checks those), the chunk list is not."""
    with registry.client("device") as client:
        manifest = client.get_raw_manifest(WRITABLE, digest)
        descriptor = manifest.layers[0]
        real = index_layer(io.BytesIO(client.get_blob(WRITABLE, descriptor["digest"])), descriptor["mediaType"])
    chunks = ChunkList()
    for cid in victim_ids:
        chunks.append(cid, lengths[cid])
    total = chunks.total()
    layer = LayerIndex(real.media_type, real.digest, real.size, real.diff_id, total, array("Q", [0, total]),
                       ChunkList(), chunks, real.compression)
    return ImageIndex(digest, [layer]).encode()


def push_index(registry: Registry, digest: str, index_data: bytes) -> None:
    """Pushes `index_data` as the chunk index of WRITABLE@digest, with the device's own credentials."""
    with registry.client("device") as client:
        manifest: Manifest = client.get_raw_manifest(WRITABLE, digest)
        client.push_blob(WRITABLE, OCI_EMPTY_DATA, OCI_EMPTY_DIGEST)
        client.push_blob(WRITABLE, index_data, sha256_digest(index_data))
        client.push_referrer(WRITABLE, artifact_manifest(manifest, decode_index(index_data), index_data), digest)


def test_forged_index_in_a_writable_repository_gets_no_chunk_of_b(world: dict) -> None:
    registry, server, device = world["registry"], world["server"], world["device"]
    only, lengths = secret_only_ids(world)
    victim = sorted(only)
    push_index(registry, world["evil"], forged_index(registry, world["evil"], victim, lengths))
    # The server must re-chunk the layer before serving through this index, and then refuses it.
    for path, request in (("/v1/sync", SyncRequest(WRITABLE, world["evil"]).encode()),
                          ("/v1/chunks", ChunksRequest(WRITABLE, world["evil"], b"".join(victim)).encode())):
        response = post(server.url, path, request, device)
        assert response.status_code != 200 or not set(Answer(response).ids) & only, "B's chunks went out"
        assert_error(response, 502, "does not match layer")
    for cid in victim[:3]:
        response = httpx.get(f"{server.url}/v1/chunks/{cid.hex()}?repository={WRITABLE}&manifest={world['evil']}",
                             headers={"Authorization": device})
        assert response.status_code != 200, "a chunk of B went out by id through a forged index"
