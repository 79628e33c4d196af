"""The bounded in-memory image pool of a synthesizer, and its Parquet form.

Images are kept as uint8 on the training device (what the public code's PNG round-trip did to them,
without the files), with the teacher's logits on the un-augmented image and the synthesis call that
made them. When full, the oldest images are overwritten (a ring buffer). Storage grows by doubling up
to `capacity`, so a small run does not reserve the whole bound.

Parquet layout (one row per image; read by the Ray layer to shard and by `read_pool_parquet`):
  image: binary (C*H*W uint8 bytes, CHW order), logits: list<float32> (teacher logits), call: int64
  schema metadata b"kdci_ray": JSON {format, image_shape, num_classes, rows, ...caller's metadata}
Columns are zstd-compressed (lossless: the teacher's logits stay those of the stored pixels).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

PARQUET_FORMAT = 1
_META_KEY = b"kdci_ray"


class ImagePool:
    def __init__(self, capacity: int, image_shape: tuple[int, int, int], num_classes: int, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"pool capacity must be >= 1, got {capacity}")
        self.capacity, self.image_shape, self.num_classes = int(capacity), tuple(image_shape), int(num_classes)
        self.device = torch.device(device)
        self.images = torch.empty((0, *self.image_shape), dtype=torch.uint8, device=self.device)
        self.logits = torch.empty((0, self.num_classes), dtype=torch.float32, device=self.device)
        self.calls = torch.empty((0,), dtype=torch.int64, device=self.device)
        self.size = 0  # filled rows
        self.next = 0  # ring position of the next write
        self.total_added = 0
        self.written = 0  # rows written into the ring so far: row w sits at position w % capacity
        self._journal: list[tuple[int, int, str]] = []  # (first row, end row, file) of the segments in the last journal state
        self._unreferenced: list[str] = []  # segments the last journal state dropped (deleted at the next one)
        self._loaded_from: Path | None = None  # the folder of the journal this pool was restored from

    def __len__(self) -> int:
        return self.size

    def filled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, logits, calls) of the filled rows (the storage may be larger)."""
        return self.images[: self.size], self.logits[: self.size], self.calls[: self.size]

    def to(self, device: torch.device | str) -> "ImagePool":
        self.device = torch.device(device)
        self.images, self.logits, self.calls = (t.to(self.device) for t in (self.images, self.logits, self.calls))
        return self

    def _grow(self, needed: int) -> None:
        have = self.images.shape[0]
        if needed <= have:
            return
        new = min(self.capacity, max(needed, 2 * have))
        extra = new - have
        self.images = torch.cat([self.images, self.images.new_empty((extra, *self.image_shape))])
        self.logits = torch.cat([self.logits, self.logits.new_empty((extra, self.num_classes))])
        self.calls = torch.cat([self.calls, self.calls.new_empty((extra,))])

    def add(self, images: torch.Tensor, logits: torch.Tensor, call: int) -> None:
        """Add a batch: `images` uint8, or float in [0, 1] (rounded to uint8); `logits` (B, num_classes)."""
        if images.dtype != torch.uint8:
            images = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
        if tuple(images.shape[1:]) != self.image_shape or logits.shape != (images.shape[0], self.num_classes):
            raise ValueError(
                f"pool expects images (B, {', '.join(map(str, self.image_shape))}) and logits (B, {self.num_classes}); "
                f"got {tuple(images.shape)} and {tuple(logits.shape)}"
            )
        self.total_added += images.shape[0]
        images, logits = images[-self.capacity :], logits[-self.capacity :]  # a batch larger than the pool keeps its tail
        n = images.shape[0]
        self._grow(min(self.capacity, self.size + n))
        # Positions of the n rows in the ring; wrapping writes over the oldest rows.
        pos = (self.next + torch.arange(n, device=self.device)) % self.capacity
        self.images[pos] = images.to(self.device)
        self.logits[pos] = logits.detach().float().to(self.device)
        self.calls[pos] = call
        self.next = (self.next + n) % self.capacity
        self.size = min(self.capacity, self.size + n)
        self.written += n

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A KD batch drawn uniformly (with replacement) from the filled pool; uint8 on the pool's device."""
        if self.size == 0:
            raise RuntimeError("the image pool is empty: run a synthesis call first")
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=generator)
        return self.images.index_select(0, idx)

    def batches(self, batch_size: int = 1024) -> Iterator[torch.Tensor]:
        for start in range(0, self.size, batch_size):
            yield self.images[start : min(start + batch_size, self.size)]

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        images, logits, calls = self.filled()
        return {
            "images": images.cpu(), "logits": logits.cpu(), "calls": calls.cpu(),
            "next": self.next, "total_added": self.total_added, "capacity": self.capacity,
        }

    def journal_state(self, folder: Path, prefix: str = "pool-") -> tuple[dict, list[Path]]:
        """The pool's checkpoint state with its rows in segment files under `folder` instead of inline: only the
        rows written since the last call go into a new file (a checkpoint no longer rewrites the whole pool).
        Returns (state, every segment file the state needs). Segments whose rows have all been overwritten are
        left out, and deleted at the next call (when no checkpoint on disk refers to them any more)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        for name in self._unreferenced:
            (folder / name).unlink(missing_ok=True)
        end = self.written
        first_needed = max(0, end - self.capacity)
        start = max(self._journal[-1][1] if self._journal else 0, first_needed)
        if end > start:
            positions = torch.arange(start, end, device=self.device) % self.capacity
            name = f"{prefix}{start:012d}-{end:012d}.safetensors"
            tmp = folder / (name + ".tmp")
            save_file({"images": self.images[positions].cpu().contiguous(), "logits": self.logits[positions].cpu().contiguous(),
                       "calls": self.calls[positions].cpu().contiguous()}, str(tmp))
            tmp.replace(folder / name)
            self._journal.append((start, end, name))
        kept = [seg for seg in self._journal if seg[1] > first_needed]
        for seg in kept:  # resumed from a checkpoint elsewhere (a launcher's copy): its segments come along
            if not (folder / seg[2]).is_file() and self._loaded_from is not None and (self._loaded_from / seg[2]).is_file():
                shutil.copy2(self._loaded_from / seg[2], folder / seg[2])
        self._unreferenced = [seg[2] for seg in self._journal if seg[1] <= first_needed]
        self._journal = kept
        state = {"journal": [list(seg) for seg in kept], "written": end, "size": self.size, "next": self.next,
                 "total_added": self.total_added, "capacity": self.capacity, "image_shape": list(self.image_shape)}
        return state, [folder / seg[2] for seg in kept]

    def _load_journal(self, state: dict) -> None:
        from safetensors.torch import load_file

        if state["capacity"] != self.capacity or tuple(state["image_shape"]) != self.image_shape:
            raise ValueError(f"pool state has capacity {state['capacity']} and images {tuple(state['image_shape'])}; "
                             f"this pool has {self.capacity} and {self.image_shape}")
        folder = Path(state.get("folder", "."))
        size, end = state["size"], state["written"]
        images = torch.empty((size, *self.image_shape), dtype=torch.uint8)
        logits = torch.empty((size, self.num_classes), dtype=torch.float32)
        calls = torch.empty((size,), dtype=torch.int64)
        for start, stop, name in state["journal"]:
            path = folder / name
            if not path.is_file():
                raise ValueError(f"{path} is missing: the checkpoint's image pool is kept in segment files beside it; "
                                 "copy the whole checkpoint folder, or start over (output.overwrite=true)")
            seg = load_file(str(path))
            rows = torch.arange(start, stop)
            keep = rows >= end - self.capacity
            positions = rows[keep] % self.capacity
            images[positions], logits[positions], calls[positions] = seg["images"][keep], seg["logits"][keep], seg["calls"][keep]
        self.images, self.logits, self.calls = images.to(self.device), logits.to(self.device), calls.to(self.device)
        self.size, self.next, self.total_added, self.written = size, state["next"], state["total_added"], end
        self._journal = [tuple(seg) for seg in state["journal"]]
        self._unreferenced, self._loaded_from = [], folder

    def load_state_dict(self, state: dict) -> None:
        if "journal" in state:
            return self._load_journal(state)
        if state["capacity"] != self.capacity or tuple(state["images"].shape[1:]) != self.image_shape:
            raise ValueError(
                f"pool state has capacity {state['capacity']} and images {tuple(state['images'].shape[1:])}; "
                f"this pool has {self.capacity} and {self.image_shape}"
            )
        self.images = state["images"].to(self.device)
        self.logits = state["logits"].to(self.device)
        self.calls = state["calls"].to(self.device)
        self.size, self.next, self.total_added = self.images.shape[0], state["next"], state["total_added"]
        self.written = state.get("written", self.size if self.size < self.capacity else self.next + self.capacity)
        self._journal, self._unreferenced = [], []

    # -- Parquet -------------------------------------------------------------------------------
    def to_parquet(self, path: str | Path, metadata: dict | None = None) -> Path:
        return write_pool_parquet(path, *self.filled(), metadata)


@dataclass
class PoolData:
    images: torch.Tensor  # uint8 (N, C, H, W)
    logits: torch.Tensor  # float32 (N, num_classes)
    calls: torch.Tensor  # int64 (N,)
    meta: dict = field(default_factory=dict)


def write_pool_parquet(
    path: str | Path, images: torch.Tensor, logits: torch.Tensor, calls: torch.Tensor, metadata: dict | None = None,
    columns: dict[str, str | int] | None = None,
) -> Path:
    """Write images (uint8 NCHW) + teacher logits + synthesis call as Parquet; atomic (tmp + rename).
    `columns`: constant per-row columns (e.g. method, seed, shard, config hash of a generation job)."""
    path = Path(path)
    images = images.detach().cpu().contiguous()
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 NCHW, got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    flat = images.numpy().reshape(n, c * h * w)
    num_classes = int(logits.shape[1])
    meta = {"format": PARQUET_FORMAT, "image_shape": [c, h, w], "num_classes": num_classes, "rows": n, **(metadata or {})}
    table = pa.table(
        {
            "image": pa.array([row.tobytes() for row in flat], type=pa.binary()),
            "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.detach().cpu().float().numpy().reshape(-1)), num_classes),
            "call": pa.array(calls.detach().cpu().numpy().astype(np.int64)),
            **{name: pa.array([value] * n) for name, value in (columns or {}).items()},
        }
    ).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")  # level 1: fast, and smooth synthetic images shrink (64-224 px pools)
    tmp.replace(path)
    return path


@dataclass
class PoolSchema:
    """A Parquet pool as its footers describe it (no image read): checked once, before any data moves."""
    files: list[Path]
    rows: list[int]  # per file
    meta: dict  # the first file's kdci_ray metadata

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])


def read_pool_schema(path: str | Path) -> PoolSchema:
    """Check a pool written by `write_pool_parquet` (a file, or a folder of shards) from its footers:
    the columns (image, logits, call), the format, and shards that agree on image shape, classes, method
    and teacher. Cheap enough for a driver to call before it starts any worker."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pool Parquet at {path}")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path} holds no .parquet files")
    rows, meta = [], None
    for file in files:
        try:
            footer = pq.read_metadata(file)
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{file} cannot be read as Parquet ({str(exc).splitlines()[0][:120]}); regenerate the pool") from None
        schema = footer.schema.to_arrow_schema()
        raw = (schema.metadata or {}).get(_META_KEY)
        if raw is None or not {"image", "logits", "call"} <= set(schema.names):
            missing = sorted({"image", "logits", "call"} - set(schema.names))
            raise ValueError(f"{file} is not a kdci_ray pool (needs columns image, logits, call and kdci_ray metadata"
                             f"{'; missing ' + ', '.join(missing) if missing else ''}): write it with jobs/synthesize.py")
        file_meta = json.loads(raw)
        if file_meta.get("format", 0) > PARQUET_FORMAT:
            raise ValueError(f"{file} has pool format {file_meta['format']}; this kdci_ray reads <= {PARQUET_FORMAT}: upgrade it")
        if meta is not None:
            for key in ("image_shape", "num_classes", "method", "teacher_id"):
                if file_meta.get(key) != meta.get(key):
                    raise ValueError(f"{file}: {key} {file_meta.get(key)!r} differs from the other shards' {meta.get(key)!r} in {path}")
        meta = meta or file_meta
        rows.append(footer.num_rows)
    return PoolSchema(files, rows, meta)


def _decode_images(table: pa.Table, shape: list[int], file: Path) -> torch.Tensor:
    c, h, w = shape
    n = table.num_rows
    blob = b"".join(table.column("image").to_pylist())
    if len(blob) != n * c * h * w:
        raise ValueError(f"{file}: image bytes do not match the declared shape {shape}")
    return torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).reshape(n, c, h, w).copy())


def read_pool_rows(path: str | Path, start: int, stop: int, schema: PoolSchema | None = None) -> torch.Tensor:
    """The images (uint8 NCHW) of rows [start, stop) of a pool, in file order, reading only the files
    (and only the image column) that hold them: a data-parallel worker's share, read once."""
    schema = schema or read_pool_schema(path)
    if not 0 <= start <= stop <= schema.total_rows:
        raise IndexError(f"rows [{start}, {stop}) outside the pool's {schema.total_rows} rows ({path})")
    parts, offset = [], 0
    for file, n in zip(schema.files, schema.rows):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            table = pq.read_table(file, columns=["image"]).slice(lo - offset, hi - lo)
            parts.append(_decode_images(table, schema.meta["image_shape"], file))
        offset += n
    if not parts:
        return torch.empty(0, *schema.image_shape, dtype=torch.uint8)
    return torch.cat(parts)


def read_pool_parquet(path: str | Path) -> PoolData:
    """Read a pool written by `write_pool_parquet` (a file, or a folder of such files written as shards)."""
    schema = read_pool_schema(path)
    parts = []
    for file in schema.files:
        table = pq.read_table(file)
        file_meta = json.loads(table.schema.metadata[_META_KEY])
        n = table.num_rows
        images = _decode_images(table, file_meta["image_shape"], file)
        logits = torch.from_numpy(
            table.column("logits").combine_chunks().flatten().to_numpy().astype(np.float32).reshape(n, file_meta["num_classes"])
        )
        calls = torch.from_numpy(table.column("call").to_numpy().astype(np.int64))
        parts.append((images, logits, calls))
    images, logits, calls = (torch.cat(p) for p in zip(*parts))
    meta = {**schema.meta, "rows": int(images.shape[0]), "files": len(schema.files)}
    return PoolData(images, logits, calls, meta)
