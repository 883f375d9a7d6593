"""Files uploaded for OpenAI's Batch API (`purpose: batch`), kept in Redis with the TTL of
the deployment's bulk jobs, or in a folder that every gateway of the deployment shares.

A batch's output and error files are not stored: their content is rendered from the bulk
job's results when read (`batch_routes`), under ids derived from the batch id.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from mii.gateway.errors import not_found


@dataclass(frozen=True)
class FileMeta:
    """OpenAI's file object."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str = "batch"
    object: str = "file"
    status: str = "processed"

    def as_dict(self) -> dict:
        return asdict(self)


def new_file(filename: str, size: int) -> FileMeta:
    return FileMeta(f"file-{uuid.uuid4().hex[:24]}", size, int(time.time()), filename)


class RedisFiles:
    """One hash per file (`meta`, `content`), expiring `ttl_s` after the upload."""

    def __init__(self, redis, keys, ttl_s: int) -> None:
        self.redis, self.keys, self.ttl_s = redis, keys, ttl_s

    def put(self, meta: FileMeta, content: bytes) -> None:
        key = self.keys.file(meta.id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"meta": json.dumps(meta.as_dict()), "content": content})
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def meta(self, file_id: str) -> FileMeta:
        raw = self.redis.hget(self.keys.file(file_id), "meta")
        if raw is None:
            raise _missing(file_id)
        return FileMeta(**json.loads(raw))

    def content(self, file_id: str) -> bytes:
        raw = self.redis.hget(self.keys.file(file_id), "content")
        if raw is None:
            raise _missing(file_id)
        return raw

    def delete(self, file_id: str) -> bool:
        return bool(self.redis.delete(self.keys.file(file_id)))


class FolderFiles:
    """`<id>.json` (meta) and `<id>.jsonl` (content) in a folder; no expiry."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, meta: FileMeta, content: bytes) -> None:
        self._write(self.folder / f"{meta.id}.jsonl", content)
        self._write(self.folder / f"{meta.id}.json", json.dumps(meta.as_dict()).encode())

    def meta(self, file_id: str) -> FileMeta:
        return FileMeta(**json.loads(self._read(file_id, ".json")))

    def content(self, file_id: str) -> bytes:
        return self._read(file_id, ".jsonl")

    def delete(self, file_id: str) -> bool:
        found = False
        for suffix in (".json", ".jsonl"):
            path = self.folder / f"{_safe(file_id)}{suffix}"
            found |= path.exists()
            path.unlink(missing_ok=True)
        return found

    def _read(self, file_id: str, suffix: str) -> bytes:
        try:
            return (self.folder / f"{_safe(file_id)}{suffix}").read_bytes()
        except OSError:
            raise _missing(file_id) from None

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers on other gateways never see half a file


def _safe(file_id: str) -> str:
    if not file_id.replace("-", "").replace("_", "").isalnum():
        raise _missing(file_id)
    return file_id


def _missing(file_id: str):
    return not_found(f"No such File object: {file_id}")
