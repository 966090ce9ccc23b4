"""Image sets as uint8 batches: shard sets (this project's) and `.npz` batches (ADM's evaluator layout).

The `.npz` layout is guided-diffusion's: one uint8 array ``arr_0`` of shape (N, H, W, 3). It is
written as a stream (header, then the rows), so a 50,000-image batch never sits in memory.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mvar.data import storage
from mvar.data.imaging import decode
from mvar.data.manifest import read_manifest
from mvar.data.samples import IMAGE_EXTS
from mvar.data.tario import iter_tar_samples
from mvar.errors import UserError
from mvar.files import NPZ_ERRORS, one_line


@dataclass(frozen=True)
class ImageSet:
    """Where images are and what they are: a shard directory/URL or an ADM-layout `.npz`."""

    location: str
    num_images: int
    image_size: int


def is_npz(location: str) -> bool:
    return location.endswith(".npz")


def open_image_set(location: str) -> ImageSet:
    """Size and count of an image set, without reading its images (an error names the location)."""
    if is_npz(location):
        shape = npz_array_shape(location, "arr_0")
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise UserError(f"'{location}': arr_0 has shape {shape}, expected (N, S, S, 3) uint8 images")
        return ImageSet(location, shape[0], shape[1])
    manifest = read_manifest(location)
    if manifest.kind != "images":
        raise UserError(f"'{location}' holds {manifest.kind} shards; an image set is needed")
    return ImageSet(location, manifest.num_samples, manifest.image_size)


def npz_array_shape(path: str, name: str) -> tuple[int, ...]:
    """Shape of one array of an `.npz` from its header only."""
    if not os.path.isfile(path):
        raise UserError(f"'{path}' does not exist")
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(fh)
    except KeyError:
        raise UserError(f"'{path}' has no array '{name}'") from None
    except NPZ_ERRORS as err:
        raise UserError(f"'{path}' is not a readable .npz file: {one_line(err)}") from None
    return tuple(shape)


def iter_shard_images(location: str) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 (S, S, 3), label) for every sample of a shard set, in manifest order."""
    manifest = read_manifest(location)
    for shard in manifest.shards:
        with storage.open_read(storage.join(location, shard.name)) as stream:
            for key, sample in iter_tar_samples(stream):
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    raise UserError(f"'{location}/{shard.name}': sample '{key}' has no image member")
                yield decode(sample[ext]), int(sample.get("cls", b"-1"))


def iter_labelled_images(location: str) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 (S, S, 3), label) of a shard set, or of an `.npz` with label -1 (ADM batches carry none)."""
    if is_npz(location):
        yield from ((image, -1) for image in iter_images(location))
    else:
        yield from iter_shard_images(location)


def iter_images(location: str) -> Iterator[np.ndarray]:
    """uint8 (S, S, 3) images of a shard set or an `.npz`."""
    if is_npz(location):
        try:
            with np.load(location) as data:
                arr = data["arr_0"]
        except NPZ_ERRORS as err:
            raise UserError(f"'{location}' is not a readable .npz of images (arr_0): {one_line(err)}") from None
        yield from arr
    else:
        yield from (image for image, _ in iter_shard_images(location))


def batched_tensors(images_HW3: Iterable[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) tensors of ``batch_size`` images (the last one smaller)."""
    batch: list[np.ndarray] = []
    for image in images_HW3:
        batch.append(image)
        if len(batch) == batch_size:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def write_images_npz(path: str, images_HW3: Iterable[np.ndarray], num_images: int, image_size: int) -> str:
    """Stream images into an ADM-layout `.npz` (``arr_0``: uint8 (N, S, S, 3)); atomic."""
    shape = (num_images, image_size, image_size, 3)
    tmp = f"{path}.tmp-{os.getpid()}"
    written = 0
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
                zf.open("arr_0.npy", "w", force_zip64=True) as fh:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": shape}
            np.lib.format.write_array_header_1_0(fh, header)
            for image in images_HW3:
                if image.shape != shape[1:] or image.dtype != np.uint8:
                    raise ValueError(f"image {written} is {image.dtype} {image.shape}, expected uint8 {shape[1:]}")
                fh.write(np.ascontiguousarray(image).tobytes())
                written += 1
        if written != num_images:
            raise ValueError(f"{written} images written to {path}, expected {num_images}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
