"""``tpconv convert --resume``: keep the rank files a killed conversion finished, redo the rest.

Every conversion appends a line to a journal in its temporary directory as each rank file is fsynced
(path, bytes, sha256 of the file and of each tensor), and the conversion's cache key once the source
is hashed. A later ``--resume`` adopts the temporary directory of a conversion whose process is gone
(``converter.atomic``), keeps a file only when the journal has the same key, names it, and the file
still hashes to what was journaled, and writes everything else; the journal is deleted before the
rename, so the workspace is byte for byte what a clean conversion writes, and still appears atomically.
"""
from __future__ import annotations

import concurrent.futures
import json
import shutil
from pathlib import Path

from converter.writer import Written, sha256_file

JOURNAL = ".tpconv-journal.jsonl"


class Journal:
    def __init__(self, path: Path, key: concurrent.futures.Future, kept: dict[str, dict]):
        self._path, self._key, self._kept = path, key, kept
        self._key_written = False
        self.kept = 0  # files reused
        self._f = open(path, "a")  # noqa: SIM115 -- appended to for the whole conversion, closed by close()
        for record in kept.values():  # still valid if this run is killed too
            self._append(record)

    @classmethod
    def open(cls, tmp: Path, key: concurrent.futures.Future, resume: bool) -> Journal:
        """The journal of ``tmp``; with ``resume``, the records of an adopted directory whose key matches."""
        path = tmp / JOURNAL
        kept: dict[str, dict] = {}
        if resume and path.is_file():
            old_key, records = _read(path)
            if old_key == key.result():  # blocks until the source is hashed: resuming must be sure
                kept = records
        if not kept:  # nothing to keep: start from an empty directory, whatever was adopted
            _empty(tmp)
        else:
            path.unlink()
        return cls(path, key, kept)

    def reuse(self, root: Path, rel: str) -> Written | None:
        """The journaled result for ``rel`` when the file on disk still matches it."""
        record = self._kept.get(rel)
        path = root / rel
        if record is None or not path.is_file() or path.stat().st_size != record["bytes"]:
            return None
        if sha256_file(path) != record["sha256"]:
            return None
        self.kept += 1
        return Written(path, record["bytes"], record["sha256"], dict(record["tensors"]))

    def record(self, rel: str, written: Written) -> None:
        self._append({"path": rel, "bytes": written.nbytes, "sha256": written.sha256,
                      "tensors": written.tensor_sha256})

    def close(self) -> None:
        """Delete the journal: it is not part of the workspace."""
        self._f.close()
        self._path.unlink(missing_ok=True)

    def _append(self, record: dict) -> None:
        if not self._key_written and self._key.done() and self._key.exception() is None:
            self._f.write(json.dumps({"key": self._key.result()}) + "\n")
            self._key_written = True
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()


def _read(path: Path) -> tuple[str | None, dict[str, dict]]:
    """The key and the file records of a journal; a line cut by the kill ends it."""
    key, records = None, {}
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            break
        if "key" in item:
            key = item["key"]
        else:
            records[item["path"]] = item
    return key, records


def _empty(tmp: Path) -> None:
    for entry in tmp.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
