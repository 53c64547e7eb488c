"""Image data: a labelled-image container, the user's own images from disk, stratified splits,
normalisation and small-shift augmentation.

    data = load_images("my_images.npz")            # arrays "x" [n, H, W(, C)] and "y" [n]
    data = load_images("my_images/")               # my_images/<class>/<file>.png, one folder a class
    train, test = stratified_split(data, test_fraction=0.25, seed=0)

Images are ``float32 [n, H, W, C]`` (channels last), labels ``int32 [n]`` in ``[0, num_classes)``.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.arguments import check_fraction
from jaxnet.data.checks import snippet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class ImageData:
    """Labelled images.

    Attributes:
      x: ``float32 [n, H, W, C]``.
      y: ``int32 [n]``, indices into ``class_names``.
      class_names: one name per class, in label order.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self):
        if self.x.ndim != 4:
            raise ValueError(f"ImageData.x must be [n, H, W, C], got shape {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"ImageData.y must be [n] with n = {self.x.shape[0]}, got shape {self.y.shape}")
        if self.y.size and (self.y.min() < 0 or self.y.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)}), got [{self.y.min()}, {self.y.max()}]")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index) -> "ImageData":
        return ImageData(self.x[index], self.y[index], self.class_names)


def _as_images(x: np.ndarray, source: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]  # (n, H, W) -> (n, H, W, 1)
    if x.ndim != 4:
        raise ValueError(f"{source}: images must be [n, H, W] or [n, H, W, C], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise TypeError(f"{source}: images must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~(np.abs(x) <= np.finfo(np.float32).max)  # NaN, Inf, or Inf once cast to float32
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{source}: {int(bad.sum())} pixel(s) not finite in float32, "
                             f"first x{list(first)} = {x[first]}")
    return x.astype(np.float32)


# Integer labels are class indices: label k means k + 1 classes, so a stray large value would
# allocate millions of class names; ids like that want renumber_labels=True.
MAX_CLASSES = 2**20


def _labels(y: np.ndarray, source: str, renumber: bool) -> tuple[np.ndarray, tuple[str, ...]]:
    """Dense int32 labels and class names: integer labels keep their numbering (0..max) unless
    ``renumber``; strings (and booleans) become classes in sorted order."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{source}: labels must be [n], got shape {y.shape}")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (np.round(y) != y) | (np.abs(y) >= 2.0**63)  # round(nan) is quiet
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{source}: labels must be integers, got y[{k}] = {y[k]}")
        y = y.astype(np.int64)
    if y.dtype.kind in "iu":
        if renumber:
            values, dense = np.unique(y, return_inverse=True)
            return dense.astype(np.int32), tuple(str(v) for v in values.tolist())
        if y.size and y.min() < 0:
            k = int(np.argmin(y))
            raise ValueError(f"{source}: labels are class indices and must be >= 0, got y[{k}] = {y[k]}; "
                             "renumber_labels=True numbers the distinct values 0.. in increasing order")
        if y.size and y.max() >= MAX_CLASSES:
            k = int(np.argmax(y))
            raise ValueError(f"{source}: label y[{k}] = {y[k]} would mean over {MAX_CLASSES} classes; "
                             "renumber_labels=True numbers the distinct values 0.. in increasing order")
        n = int(y.max()) + 1 if y.size else 0
        return y.astype(np.int32), tuple(str(i) for i in range(n))
    if y.dtype.kind not in "USb":
        raise TypeError(f"{source}: labels must be integers or strings, got dtype {y.dtype}")
    names, dense = np.unique(y.astype(str), return_inverse=True)
    return dense.astype(np.int32), tuple(names.tolist())


# The most bytes load_npz decompresses by default (2 GiB): a few hundred KB of zeros can expand
# to gigabytes, so the sizes are read from the headers first.
MAX_NPZ_BYTES = 2**31


# What zipfile, zlib and numpy's npy reader raise for a damaged archive (found by fuzzing: a
# flipped byte can claim encryption, an unknown method or version, or a seek before the start).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, NotImplementedError, RuntimeError)


def _read_member(archive: zipfile.ZipFile, path, name: str, read):
    """``read(stream)`` on the archive's ``name.npy``; its errors name the file and the member."""
    try:
        with archive.open(f"{name}.npy") as member:
            return read(member)
    except _ZIP_ERRORS as e:
        raise ValueError(f"{path}: member {name}.npy: {str(e)[:80]}") from e


def _npy_bytes(member) -> int:
    """Bytes of the array an .npy stream holds, from its header alone."""
    version = np.lib.format.read_magic(member)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    # 3.0 differs from 2.0 only in the header's text encoding (utf-8, not latin-1).
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(member)
    return math.prod(shape) * dtype.itemsize


def load_npz(path: str | pathlib.Path, *, renumber_labels: bool = False,
             max_bytes: int | None = MAX_NPZ_BYTES) -> ImageData:
    """Images from an ``.npz`` with arrays ``x: [n, H, W(, C)]`` and ``y: [n]``.

    uint8 images are scaled to [0, 1]; other dtypes are kept as they are (cast to float32; floats
    must be finite). Labels ``y``: integers are class indices (``>= 0``, class ``k`` named
    ``str(k)``), floats must hold integers and count as such; strings are class names, numbered in
    sorted order. ``renumber_labels=True`` instead numbers any distinct integer values (negative
    ones too) ``0..k-1`` in increasing order, each named by its value.

    ``max_bytes``: refuse an archive whose ``x`` and ``y`` would expand to more bytes than this,
    read from the zip and npy headers before anything is decompressed; None for no limit.

    Raises:
      FileNotFoundError: if there is no file ``path``.
      KeyError: if ``x`` or ``y`` is missing.
      ValueError: naming the file (and the member) for anything else it cannot honour: not a zip,
        a damaged member, too large, pickled objects, non-finite pixels, labels as above.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise ValueError(f"{path}: not an .npz (zip) archive ({str(e)[:80]})") from e
    with archive:
        files = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
        missing = {"x", "y"} - set(files)
        if missing:
            raise KeyError(f"{path}: needs arrays 'x' and 'y', missing {sorted(missing)} (has {snippet(files)})")
        # Either header may lie; each bounds a different step of the read, so take the larger.
        size = sum(max(archive.getinfo(f"{name}.npy").file_size, _read_member(archive, path, name, _npy_bytes))
                   for name in ("x", "y"))
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"{path}: x and y would expand to {size} bytes, over max_bytes={max_bytes}; "
                             "pass a larger max_bytes (or None) to load it")
        arrays = {name: _read_member(archive, path, name, np.lib.format.read_array) for name in ("x", "y")}
    raw_x, raw_y = arrays["x"], arrays["y"]
    x = _as_images(raw_x, str(path))
    if raw_x.dtype == np.uint8:
        x = x / 255.0
    y, names = _labels(raw_y, str(path), renumber_labels)
    if len(y) != len(x):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return ImageData(x, y, names)


# Pillow modes with more than 8 bits a channel (one channel each), read without Pillow's
# conversions, which clip them to 8 bits.
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _read_image(file: pathlib.Path, grayscale: bool | None) -> np.ndarray:
    """``float32 [H, W]`` (one channel) or ``[H, W, 3]`` in [0, 1] (see ``load_folder``)."""
    from PIL import Image  # Pillow comes with matplotlib (the "plots" extra)

    try:
        with Image.open(file) as img:
            img.load()
            mode = img.mode
            if mode not in _DEEP_MODES:
                if grayscale is True:
                    img = img.convert("L")
                elif grayscale is False or mode not in ("L", "RGB"):
                    img = img.convert("RGB")
                return np.asarray(img, dtype=np.float32) / 255.0
            pixels = np.asarray(img)  # (H, W) uint16, int32 or float32
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{file}: cannot read the image ({snippet(e)})") from e
    lo, hi = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if mode == "F":
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
            raise ValueError(f"{file}: float pixels span [{lo}, {hi}]; float images are read as they are "
                             "and must lie in [0, 1]: scale them (or save 8/16-bit integers)")
        out = pixels.astype(np.float32)
    else:  # 16-bit; Pillow opens some 16-bit files as 32-bit "I"
        if lo < 0 or hi > 65535:
            raise ValueError(f"{file}: 32-bit integer pixels span [{lo:.0f}, {hi:.0f}], beyond 16 bits "
                             "[0, 65535]; save them as 8 or 16-bit images")
        out = pixels.astype(np.float32) / 65535.0
    return np.repeat(out[..., None], 3, axis=-1) if grayscale is False else out


def load_folder(path: str | pathlib.Path, *, grayscale: bool | None = None) -> ImageData:
    """Images from ``path/<class name>/<image file>``; classes in sorted folder-name order.

    All images must have one size. Pixels are scaled to [0, 1] by their real range: 8-bit by 255,
    16-bit by 65535; float images (TIFF mode "F") are taken as they are and must lie in [0, 1].
    ``grayscale``: convert to one channel (True), to RGB (False), or keep the files' own mode
    when they all agree (None; 16-bit and float images have one channel).

    Raises:
      ValueError: for a class folder with no image files (listing them), a file that is not a
        readable image (naming it), float pixels outside [0, 1], or images of different sizes.
    """
    root = pathlib.Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    files = {name: sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
             for name in classes}
    empty = [name for name in classes if not files[name]]
    if len(empty) == len(classes):
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in {snippet(classes)}")
    if empty:
        raise ValueError(f"{root}: {len(empty)} class folder(s) with no image files: {snippet(empty)}; "
                         "add images or remove them")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in files[name]:
            images.append(_read_image(file, grayscale))
            labels.append(label)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images differ in size or mode: {snippet(sorted(shapes))}; resize them first")
    return ImageData(_as_images(np.stack(images), str(root)), np.asarray(labels, np.int32), tuple(classes))


def load_images(path: str | pathlib.Path, **kwargs) -> ImageData:
    """``load_npz`` for a ``.npz`` file, ``load_folder`` for a directory (``kwargs`` go to it)."""
    path = pathlib.Path(path)
    if path.is_dir():
        return load_folder(path, **kwargs)
    if path.suffix == ".npz":
        return load_npz(path, **kwargs)
    raise ValueError(f"{path}: expected an .npz file or a folder of class sub-folders")


def stratified_split(data: ImageData, *, test_fraction: float, seed: int = 0) -> tuple[ImageData, ImageData]:
    """``(train, test)`` with every class split in the same proportion (scikit-learn's
    ``train_test_split(..., stratify=y, random_state=seed)``, so splits match its baselines)."""
    from sklearn.model_selection import train_test_split

    test_fraction = check_fraction(test_fraction, "test_fraction")  # an int would be a count to sklearn
    idx = np.arange(len(data.y))
    train, test = train_test_split(idx, test_size=test_fraction, stratify=data.y, random_state=seed)
    return data.subset(train), data.subset(test)


def standardize(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Subtracts the training images' mean and divides by their std (scalars over all pixels),
    applying the training statistics to ``others`` too."""
    mean, std = float(train.mean()), float(train.std()) or 1.0
    return tuple(((a - mean) / std).astype(np.float32) for a in (train, *others))


def random_shift(key: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
    """Translates every image by its own random whole-pixel offset in ``[-max_shift, max_shift]``²
    (augmentation). ``x: [B, H, W, C]`` -> ``[B, H, W, C]``; vacated pixels repeat the edge."""
    if max_shift <= 0:
        return x
    b, h, w, c = x.shape
    s = max_shift
    padded = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (b, 2), 0, 2 * s + 1)

    def crop(img, off):  # img: (H + 2s, W + 2s, C)
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)
