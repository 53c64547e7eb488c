"""Image data: a labelled-image container, the user's own images from disk, stratified splits,
normalisation and small-shift augmentation.

    data = load_images("my_images.npz")            # arrays "x" [n, H, W(, C)] and "y" [n]
    data = load_images("my_images/")               # my_images/<class>/<file>.png, one folder a class
    train, test = stratified_split(data, test_fraction=0.25, seed=0)

Images are ``float32 [n, H, W, C]`` (channels last), labels ``int32 [n]`` in ``[0, num_classes)``.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

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
    return x.astype(np.float32)


def _labels(y: np.ndarray, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Dense int32 labels and class names; integer labels keep their numbering (0..max)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{source}: labels must be [n], got shape {y.shape}")
    if np.issubdtype(y.dtype, np.integer) and (y.size == 0 or y.min() >= 0):
        n = int(y.max()) + 1 if y.size else 0
        return y.astype(np.int32), tuple(str(i) for i in range(n))
    names, dense = np.unique(y.astype(str), return_inverse=True)
    return dense.astype(np.int32), tuple(names.tolist())


def load_npz(path: str | pathlib.Path) -> ImageData:
    """Images from an ``.npz`` with arrays ``x: [n, H, W(, C)]`` and ``y: [n]`` (ints or names).

    uint8 images are scaled to [0, 1]; other dtypes are kept as they are (cast to float32).
    """
    with np.load(path, allow_pickle=False) as f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise KeyError(f"{path}: needs arrays 'x' and 'y', missing {sorted(missing)} (has {f.files})")
        raw_x, raw_y = f["x"], f["y"]
    x = _as_images(raw_x, str(path))
    if raw_x.dtype == np.uint8:
        x = x / 255.0
    y, names = _labels(raw_y, str(path))
    if len(y) != len(x):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return ImageData(x, y, names)


def load_folder(path: str | pathlib.Path, *, grayscale: bool | None = None) -> ImageData:
    """Images from ``path/<class name>/<image file>``; classes in sorted folder-name order.

    All images must have one size. Pixels are scaled to [0, 1]. ``grayscale``: convert to one
    channel (True), to RGB (False), or keep the files' own mode when they all agree (None).
    """
    from PIL import Image  # Pillow comes with matplotlib (the "plots" extra)

    root = pathlib.Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            with Image.open(file) as img:
                if grayscale is True:
                    img = img.convert("L")
                elif grayscale is False or img.mode not in ("L", "RGB"):
                    img = img.convert("RGB")
                images.append(np.asarray(img, dtype=np.float32) / 255.0)
            labels.append(label)
    if not images:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in {classes}")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images differ in size or mode: {sorted(shapes)}; resize them first")
    return ImageData(_as_images(np.stack(images), str(root)), np.asarray(labels, np.int32), tuple(classes))


def load_images(path: str | pathlib.Path, **kwargs) -> ImageData:
    """``load_npz`` for a ``.npz`` file, ``load_folder`` for a directory."""
    path = pathlib.Path(path)
    if path.is_dir():
        return load_folder(path, **kwargs)
    if path.suffix == ".npz":
        return load_npz(path)
    raise ValueError(f"{path}: expected an .npz file or a folder of class sub-folders")


def stratified_split(data: ImageData, *, test_fraction: float, seed: int = 0) -> tuple[ImageData, ImageData]:
    """``(train, test)`` with every class split in the same proportion (scikit-learn's
    ``train_test_split(..., stratify=y, random_state=seed)``, so splits match its baselines)."""
    from sklearn.model_selection import train_test_split

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
