"""What reached the disk of W&B's offline run files (``wandb/offline-run-*-<id>/run-<id>.wandb``); a leaf module.

A process killed with kill -9 loses the W&B records its service had not written yet, so the round counter the tracker
keeps (wandb_logged.txt) can run ahead of the files. A resumed offline run replays from the last step the files hold.

The file is W&B's LevelDB-style log (wandb 0.31 ships no reader): a 7-byte header (``:W&B``, magic, version), then
32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a piece
of one protobuf ``Record``. A truncated or damaged tail (the crash) ends the scan.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

BLOCK = 32768
HEADER = 7


def history_steps(path: str | Path) -> list[int]:
    """The ``_step`` of every history record that is complete on disk, in file order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return []
    pos, pending, steps = HEADER, b"", []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        if kind not in (1, 2, 3, 4) or len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            break
        pending += chunk
        pos += HEADER + length
        if kind in (1, 4):
            record = pb.Record()
            try:
                record.ParseFromString(pending)
            except Exception:  # noqa: BLE001  (a damaged record: what follows is not trusted either)
                break
            pending = b""
            if record.WhichOneof("record_type") == "history":
                steps += [int(item.value_json) for item in record.history.item
                          if (item.key or "/".join(item.nested_key)) == "_step"]
    return steps


def last_offline_step(wandb_dir: str | Path, run_id: str) -> int:
    """The highest history step of run ``run_id`` in any of its offline run files under ``wandb_dir`` (0: none)."""
    steps = [s for f in Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb") for s in history_steps(f)]
    return max(steps, default=0)
