"""Read back what an offline W&B run logged, from its ``run-*.wandb`` file.

The file (as written by wandb 0.31) is a 7-byte header (``b":W&B"``, the magic ``0xBEE1``
as two little-endian bytes, version 0) followed by LevelDB-log style records in 32768-byte
blocks, the header counting towards the first block. Each record is a CRC32 of its type and
data (4 bytes), a little-endian length (2 bytes), a type (1 byte: 1 FULL, 2 FIRST, 3 MIDDLE,
4 LAST) and its data; fragments concatenate into one ``wandb_internal_pb2.Record``. Fewer
than 7 bytes left in a block are zero padding.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def run_file(directory: str | os.PathLike) -> str:
    """The one ``wandb/offline-run-*/run-*.wandb`` file under ``directory`` (the ``dir`` of ``wandb.init``)."""
    (path,) = glob.glob(os.path.join(os.fspath(directory), "wandb", "offline-run-*", "run-*.wandb"))
    return path


def raw_records(path: str | os.PathLike) -> list[bytes]:
    """The data of every record of a ``.wandb`` file, fragments joined, in order."""
    with open(path, "rb") as f:
        data = f.read()
    if data[: len(HEADER)] != HEADER:
        raise ValueError(f"{path}: not a W&B run file (header {data[: len(HEADER)]!r})")
    out, pending, pos = [], None, len(HEADER)
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER:  # zero padding to the end of the block
            pos += left
            continue
        if pos + RECORD_HEADER > len(data):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        pos += RECORD_HEADER
        if pos + length > len(data) or length > left - RECORD_HEADER:
            raise ValueError(f"{path}: record of {length} bytes overruns the file or block at byte {pos}")
        chunk = data[pos : pos + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: CRC mismatch in the record at byte {pos - RECORD_HEADER}")
        pos += length
        if kind == FULL:
            if pending is not None:
                raise ValueError(f"{path}: FULL record inside a fragmented one")
            out.append(chunk)
        elif kind == FIRST:
            if pending is not None:
                raise ValueError(f"{path}: FIRST record inside a fragmented one")
            pending = chunk
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise ValueError(f"{path}: {'MIDDLE' if kind == MIDDLE else 'LAST'} fragment without FIRST")
            pending += chunk
            if kind == LAST:
                out.append(pending)
                pending = None
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos - length - RECORD_HEADER}")
    if pending is not None:
        raise ValueError(f"{path}: file ends inside a fragmented record")
    return out


@dataclass
class Logged:
    """What a run logged: ``rows``, one dict per history row (key -> JSON-decoded value, in
    order; a logged dict such as a ``wandb.Histogram``, which W&B stores as one item per field
    under a nested key, comes back as a dict: ``{"_type": "histogram", "bins": [...],
    "values": [...]}``), and ``metrics``, each ``define_metric`` as a dict (``name``,
    ``glob_name``, ``step_metric``)."""

    rows: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)

    def step_metric_of(self, key: str) -> str | None:
        """The step metric the last matching ``define_metric`` gave ``key`` (None: no definition)."""
        found = None
        for m in self.metrics:
            if m["name"] == key or (m["glob_name"] and _matches(m["glob_name"], key)):
                found = m["step_metric"] or None
        return found


def _matches(glob_name: str, key: str) -> bool:
    """W&B's glob: a ``*`` suffix matches any key with the prefix (the only form used here)."""
    return key.startswith(glob_name[:-1]) if glob_name.endswith("*") else key == glob_name


def parse(directory: str | os.PathLike) -> tuple[Logged, bool]:
    """Parse the offline run under ``directory`` as it is now; also whether it holds the exit record."""
    from wandb.proto import wandb_internal_pb2

    logged, finished = Logged(), False
    for data in raw_records(run_file(directory)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in record.history.item:
                *parents, key = [item.key] if item.key else list(item.nested_key)
                node = row
                for parent in parents:  # a logged dict (e.g. a histogram) comes one field per item
                    node = node.setdefault(parent, {})
                if key in node:
                    raise ValueError(f"history row logs {[*parents, key]} twice")
                node[key] = json.loads(item.value_json)
            logged.rows.append(row)
        elif kind == "metric":
            m = record.metric
            logged.metrics.append({"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric})
        elif kind == "exit":
            finished = True
    return logged, finished


def read(directory: str | os.PathLike, timeout: float = 30.0) -> Logged:
    """What the finished offline run under ``directory`` (the ``dir`` given to ``wandb.init``)
    logged, once its file is complete.

    ``run.finish()`` can return before W&B's service has written the run file out (right after
    it, the file may hold only its 7-byte header), so this waits, up to ``timeout`` seconds,
    for the run's exit record, the last one written.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            logged, finished = parse(directory)
        except ValueError:  # a record still being written
            if time.monotonic() > deadline:
                raise
            finished = False
        if finished:
            return logged
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run_file(directory)}: no exit record after {timeout} s; was run.finish() called?")
        time.sleep(0.02)
