"""Image data for bitvit: CIFAR-10 and image-folder trees, decoded once into cached uint8 arrays.

Sources `load_split` reads:
  * the JPEG copy of CIFAR-10, as its `.tar.gz` or unpacked (`train/<class>/*.jpg`, `test/<class>/*.jpg`);
  * torchvision's official `cifar-10-batches-py` folder (read with a pickle loader that only admits
    numpy arrays, lists, dicts and strings, so a hostile file cannot run code);
  * any image-folder tree with `train/` and `test/` (optionally `val/`) folders of class folders,
    or a flat tree of class folders, read as split `all` (images: the files ending in one of `IMAGE_EXTS`,
    hidden files and folders left out, in the class folder itself: images in its other sub-folders are refused;
    class names: the folders' names, composed (NFC) as a model's are).

Splits: `train` is the training set minus a held-out validation split (`val`: the last
`val_fraction` (10 %) of each class's images, 500 per CIFAR-10 class, unless the tree has its own
`val/`); `trainval` is all of it; `test` is for final reporting only.

Decoded splits are cached as `.npy` files under `$BITVIT_CACHE` (default `~/.cache/bitvit`), keyed
by the source's real path, its size, modification and change times (a folder's: every image file's; a
`cifar-10-batches-py` folder's: every batch file's), the split, the image size and `CACHE_VERSION`, and checked
against a SHA-256 of their contents on every read.
"""
from __future__ import annotations

import contextlib
import functools
import collections
import hashlib
import io
import json
import os
import pickle
import posixpath
import sys
import tarfile
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from quant.cli import finite_number, written_whole

IMAGE_EXTS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
NO_IMAGES = f"holds no images (files ending {', '.join(IMAGE_EXTS)}; others, such as .qoi, are not read)"
SPLITS = ("train", "val", "trainval", "test", "all")
# an image file is read whole before PIL decodes it (which refuses images past 179 megapixels, 0.7 GB as RGBA): a
# larger one (a 13 MB .tar.gz held a 3 GB member of zeros named .jpg) is refused unread
MAX_IMAGE_BYTES = 1 << 30


def _is_image(name: str) -> bool:
    """Whether a file of this name is read as an image, in a tree and in an archive alike: by its suffix, any case;
    a hidden file is none (".jpg" alone, or the "._x.jpg" of metadata macOS writes beside x.jpg on other disks and
    into its archives)."""
    name = Path(name).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTS


def composed_name(folder: str) -> str:
    """A class folder's name as a class name: composed (NFC), as a model names its classes, though a tree copied
    from a Mac's HFS+ disk names "café/" decomposed ("e" and a combining accent)."""
    return unicodedata.normalize("NFC", folder)


def _refuse_one_class_twice(folders, where: str) -> None:
    """Refuse two class folders whose names compose to one class name (a decomposed copy of "café/" beside it):
    an archive's would be read as one class, a tree's as two of one name."""
    named = {}
    for folder in sorted(folders):
        if (name := composed_name(folder)) in named:
            raise ValueError(f"{where} holds class folders {ascii(named[name])} and {ascii(folder)}, one name in two "
                             f"Unicode forms: merge or rename them")
        named[name] = folder


@dataclass
class ImageSet:
    images: np.ndarray        # (N, H, W, 3) uint8
    labels: np.ndarray        # (N,) int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def require_classes(self, cfg, whose: str = "the model's") -> "ImageSet":
        """This set, if its classes are those of the model config `cfg` (in order; by number where the model
        names none, as an ImageNet config does); else one clear error. A set without class names (an
        in-memory one) is taken as it is. Names are matched composed (NFC), as the data's are read (a model
        trained before on a Mac's decomposed tree; a set `scored_by` labelled with its names as they are)."""
        named = tuple(map(composed_name, cfg.classes))
        if self.classes and named and tuple(map(composed_name, self.classes)) != named:
            raise ValueError(f"the data's classes {list(self.classes)} are not {whose} {list(cfg.classes)}")
        if self.classes and len(self.classes) != cfg.num_classes:
            raise ValueError(f"the data's {len(self.classes)} classes are not {whose} {cfg.num_classes}")
        return self

    def scored_by(self, cfg) -> "ImageSet":
        """This set labelled for scoring a model of config `cfg`: as `require_classes`, or, where its classes
        are some or all of the model's by name, in another order (photos of a cat and a dog scored by a CIFAR-10
        model), with its labels turned into the model's class indices and the model's classes. A class the model
        names twice (a hub model's labels may) is refused: its images would have no one right answer. Names are
        matched as by `require_classes`."""
        named = [composed_name(c) for c in cfg.classes]
        if (self.classes and cfg.classes and tuple(self.classes) != tuple(cfg.classes)
                and set(self.classes) <= set(named)):
            twice = [c for c in self.classes if named.count(c) > 1]
            if twice:
                raise ValueError(f"the model names the data's classes {twice} more than once; give data without them")
            index = np.array([named.index(c) for c in self.classes], dtype=np.int64)
            return ImageSet(self.images, index[self.labels], tuple(cfg.classes))
        return self.require_classes(cfg)


def class_names(classes: tuple[str, ...], n: int) -> tuple[str, ...]:
    """The names of `n` classes as shown: a name given to two classes (ImageNet's "crane", the bird and the
    machine) carries each one's index, "crane (class 134)", so that they stay apart; unnamed classes are
    "class 0", "class 1", ..."""
    if not classes:
        return tuple(f"class {i}" for i in range(n))
    count = collections.Counter(classes)
    return tuple(c if count[c] == 1 else f"{c} (class {i})" for i, c in enumerate(classes))


def load_split(path: str | os.PathLike, split: str = "train", image_size: int = 32,
               val_fraction: float = 0.1, limit: int | None = None, progress: bool = True,
               check: Callable[[ImageSet], ImageSet] | None = None) -> ImageSet:
    """One split of a data source (see the module docstring) as a uint8 array.

    `limit` keeps the first `limit` images of each class in turn (a balanced subset), decoded alone where the
    whole split is not in the cache yet. `check` (a model's `ImageSet.require_classes` or `scored_by`) gives the
    set returned; where the split is decoded, it is first given a set of no images but the split's classes, so that
    data a model cannot take is refused before minutes of decoding, not after.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:  # else blamed on the first image decoded
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}")
    if not finite_number(val_fraction) or not 0 < val_fraction < 1:  # else 0 or -1 held out one image per class
        raise ValueError(f"val_fraction must be a fraction of each class's images between 0 and 1 (split "
                         f"'trainval' holds out none), got {val_fraction!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path does not exist: {path}")
    source = _source_for(path)
    if split == "trainval" and source.has("val"):  # the tree's train/ and val/ images together
        # with a limit, each folder's own balanced pick holds all that the pick of the two together takes from it
        pick = None if limit is None else lambda labels, classes: _balanced_first(labels, limit)
        data, val = (_cached(source, s, image_size, progress, pick, None if limit is None else (s, val_fraction, limit),
                             check) for s in ("train", "val"))
        _check_same_classes(data, val, path)
        data = ImageSet(np.concatenate([data.images, val.images]),
                        np.concatenate([data.labels, val.labels]), data.classes)
        data = data if limit is None else data.subset(_balanced_first(data.labels, limit))
        return data if check is None else check(data)
    held = split in ("train", "val") and not source.has("val")  # val: held out of the train split's images

    def keep(labels: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
        """Indices of the images asked for, among the split's."""
        chosen = np.arange(len(labels))
        if held:
            held_out = _last_per_class(labels, val_fraction, classes)
            chosen = chosen[held_out if split == "val" else ~held_out]
        return chosen if limit is None else chosen[_balanced_first(labels[chosen], limit)]
    data = _cached(source, "train" if held or split == "trainval" else split, image_size, progress,
                   keep if held or limit is not None else None, None if limit is None else (split, val_fraction, limit),
                   check)
    return data if check is None else check(data)


def _last_per_class(labels: np.ndarray, fraction: float, classes: tuple[str, ...]) -> np.ndarray:
    """Boolean mask of the last `fraction` (at least one image) of every class's images."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, round(fraction * len(idx)))
        if n >= len(idx):
            name = repr(classes[c]) if c < len(classes) else str(c)
            raise ValueError(f"class {name} has {len(idx)} training images, too few to hold out "
                             f"{n} for validation")
        mask[idx[-n:]] = True
    return mask


def _balanced_first(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of `limit` images, taken round-robin over classes in file order."""
    rank = np.empty(len(labels), dtype=np.int64)  # position of each image within its class
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    return np.sort(np.lexsort((np.arange(len(labels)), rank))[:limit])


def _check_same_classes(a: ImageSet, b: ImageSet, path: Path) -> None:
    if a.classes != b.classes:
        raise ValueError(f"{path}: splits disagree on the classes ({list(a.classes)} vs {list(b.classes)})")


# ----------------------------------------------------------------------------- sources

class _Source:
    """A data source: which splits it holds and how to decode one."""
    key: str

    def has(self, split: str) -> bool:
        raise NotImplementedError

    def decode(self, split: str, image_size: int, progress: bool, keep=None, check=None) -> ImageSet:
        """The split's images, or with `keep(labels, classes)` only those at the indices it gives; `check` is given
        the split's classes (`_no_images`) before any image is decoded."""
        raise NotImplementedError


def _no_images(classes, image_size: int) -> ImageSet:
    """A set of no images but these classes: what `load_split`'s `check` is given before decoding."""
    return ImageSet(np.zeros((0, image_size, image_size, 3), np.uint8), np.zeros(0, np.int64), tuple(classes))


def _source_for(path: Path) -> _Source:
    if path.is_file():
        try:
            is_tar = tarfile.is_tarfile(path)
        except (EOFError, zlib.error, OSError) as e:  # a .gz cut within its first blocks
            raise ValueError(f"{path} is a damaged or truncated archive ({type(e).__name__}: {e})") from None
        if is_tar:
            return _TarSource(path)
        raise ValueError(f"{path} is a file but not a tar archive; give a .tar.gz of the JPEG copy, "
                         f"a cifar-10-batches-py folder or an image-folder tree")
    if not path.is_dir():  # a pipe or a device, which the folder reader would take for a tree without split folders
        raise ValueError(f"{path} is neither a file nor a folder; give a .tar.gz of the JPEG copy, a "
                         f"cifar-10-batches-py folder or an image-folder tree")
    batches = any((path / name).is_file() for name in _PickleSource.FILES)  # any one: a missing batch is named
    if batches or (path / "cifar-10-batches-py").is_dir():
        return _PickleSource(path if batches else path / "cifar-10-batches-py")
    return _FolderSource(path)


def _stat_key(path: Path) -> str:
    """A file's real path, size, modification and change times (cache key): a file replaced by one of the same size
    and modification time (cp -p) has a new change time."""
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _tree_key(root: Path) -> str:
    """Real path, names, sizes, modification and change times (as `_stat_key`) of every image file under `root`,
    and the folder each folder is or links to (cache key)."""
    root = root.resolve()  # "./x", "x/.." or a linked parent: one tree, decoded once
    h = hashlib.sha1(os.fsencode(root))  # fsencode: a name need not be UTF-8
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # class folders may be links
        dirnames.sort()
        real = os.path.realpath(dirpath)
        h.update(os.fsencode(f"{dirpath}>{real}|"))  # a link to a folder walked already adds no files of its own
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirnames.clear()
            continue
        seen.add(real)
        for name in sorted(filenames):
            if not _is_image(name):  # not read: a dangling link there is no matter
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError as e:  # a dangling link, a file without permission to read
                raise ValueError(f"cannot read {os.path.join(dirpath, name)} ({e.strerror})") from None
            h.update(os.fsencode(f"{dirpath}/{name}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"))
    return h.hexdigest()


class _FolderSource(_Source):
    def __init__(self, root: Path):
        self.root = root
        self.flat = not any((root / s).is_dir() for s in ("train", "test", "val"))
        self.key = _tree_key(root)

    def has(self, split: str) -> bool:
        return split == "all" if self.flat else (self.root / split).is_dir()

    def decode(self, split: str, image_size: int, progress: bool, keep=None, check=None) -> ImageSet:
        if not self.flat and split == "all":
            raise ValueError(f"{self.root} holds split folders (train/, test/, ...): choose one of them; split "
                             f"'all' scores a tree of class folders alone")
        cased = sorted(p.name + "/" for p in self.root.iterdir()
                       if p.is_dir() and p.name.lower() in ("train", "test", "val")) if self.flat else []
        if cased:  # Train/ and Test/ would be taken for two classes
            raise ValueError(f"{self.root} holds {', '.join(cased)}: split folders are train/, test/, val/, in "
                             f"lower case; rename them")
        if self.flat:  # an archive's top folder, unpacked, is no class folder to move or score
            inner = next((p for p in sorted(self.root.iterdir())
                          if p.is_dir() and any((p / s).is_dir() for s in ("train", "test", "val"))), None)
            if inner:
                raise ValueError(f"{self.root} holds no train/ or test/ folder, but {inner} does: give that folder")
        if self.flat and not any(p.is_dir() for p in self.root.iterdir()):  # empty, or holding the data's archive
            raise ValueError(f"{self.root} holds no train/ or test/ folder, nor class folders; give a .tar.gz of the "
                             f"JPEG copy, a cifar-10-batches-py folder or an image-folder tree")
        if self.flat and split != "all":
            raise ValueError(f"{self.root} has no train/ or test/ folder, only class folders: move them into "
                             f"{self.root / 'train'}/ (a test set into {self.root / 'test'}/) to train on them, or "
                             f"score them all as one pool with split 'all' (quant.evaluate --split all)")
        folder = self.root if split == "all" else self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.root} has no {split}/ folder")
        # a hidden folder is left out as a hidden file is (a notebook's .ipynb_checkpoints/ beside the class folders)
        class_dirs = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                            key=lambda p: composed_name(p.name))
        if not class_dirs:
            raise ValueError(f"{folder} holds no class folders")
        _refuse_one_class_twice((d.name for d in class_dirs), str(folder))
        files, labels = [], []
        for label, d in enumerate(class_dirs):
            # a hidden sub-folder is left out as a hidden file is (a NAS's metadata beside the images: .AppleDouble/)
            nested = next((p for p in sorted(d.iterdir()) if p.is_dir() and not p.name.startswith(".")
                           and any(map(_is_image, p.rglob("*")))), None)
            if nested:  # else left out without a word
                raise ValueError(f"class folder {d} holds images in its sub-folder {nested.name}/, and a class's "
                                 f"images are read from its own folder alone: move them up into {d}")
            # a folder named x.jpg is no image, as in an archive (whose images are its file members)
            found = sorted(p for p in d.iterdir() if _is_image(p.name) and not p.is_dir())
            if not found:
                raise ValueError(f"class folder {d} {NO_IMAGES}")
            files += found
            labels += [label] * len(found)
        labels, classes = np.array(labels, dtype=np.int64), tuple(composed_name(d.name) for d in class_dirs)
        if check is not None:
            check(_no_images(classes, image_size))
        chosen = np.arange(len(files)) if keep is None else keep(labels, classes)
        images = np.stack([_decode(_read_file(files[i]), str(files[i]), image_size)
                           for i in _progress(chosen, f"decoding {folder}", progress)])
        return ImageSet(images, labels[chosen], classes)


@contextlib.contextmanager
def _open_archive(path: Path):
    """`tarfile.open(path)`, with a truncated or damaged archive reported as one ValueError naming it."""
    try:
        with tarfile.open(path) as tar:
            yield tar
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(f"{path} is a damaged or truncated archive ({type(e).__name__}: {e})") from None


class _TarSource(_Source):
    """The JPEG copy as a tar archive: members `<split>/<class>/<file>`."""

    def __init__(self, path: Path):
        self.path = path
        self.key = _stat_key(path)

    @functools.cached_property
    def every(self) -> list[tarfile.TarInfo]:
        """All the archive's members (listing them decompresses all of it: seconds for CIFAR-10)."""
        with _open_archive(self.path) as tar:
            every = []
            for m in tar:  # each member's size checked before tarfile reads past it (decompressing it all)
                if m.isfile() and _is_image(m.name) and m.size > MAX_IMAGE_BYTES:
                    raise ValueError(f"image {self.path}:{m.name} is {m.size:,} bytes, over the {MAX_IMAGE_BYTES:,} "
                                     f"an image file may be (a damaged or hostile archive?)")
                every.append(m)
            # tarfile ends its listing without a word where a member's header is cut short or damaged; at the
            # end-of-archive marker it has read one whole zero block, and what follows is zeros (or nothing)
            cut = tar.fileobj.tell() != tar.offset + tarfile.BLOCKSIZE
            if cut or tar.fileobj.read(tarfile.BLOCKSIZE).strip(tarfile.NUL):
                raise ValueError(f"{self.path} is a damaged or truncated archive (a member's header is "
                                 f"{'cut short' if cut else 'damaged'})")
            return every

    @functools.cached_property
    def members(self) -> list[tarfile.TarInfo]:
        """The archive's images."""
        every = self.every
        members = [m for m in every if (m.isfile() or m.islnk() or m.issym()) and _is_image(m.name)]
        if not members:
            if any(m.name.endswith("data_batch_1") for m in every):
                raise ValueError(f"{self.path} is CIFAR-10's python archive: unpack it (tar xzf) and give its "
                                 f"cifar-10-batches-py folder")
            raise ValueError(f"{self.path} {NO_IMAGES}")
        return members

    def _target(self, m: tarfile.TarInfo) -> tarfile.TarInfo | None:
        """The file member `m` is or links to, as the unpacked tree would follow its links (hard links and
        symlinks, which a tree of duplicate images holds); None for a link to nothing the archive holds."""
        for _ in range(40):  # a chain of links, not a loop
            if m is None or m.isfile():
                return m
            if m.islnk():
                m = self._by_name.get(posixpath.normpath(m.linkname))
            elif m.issym():
                m = self._by_name.get(posixpath.normpath(posixpath.join(posixpath.dirname(m.name), m.linkname)))
            else:
                return None
        return None

    @functools.cached_property
    def _by_name(self) -> dict[str, tarfile.TarInfo]:
        return {posixpath.normpath(x.name): x for x in self.every}

    def has(self, split: str) -> bool:
        """Whether the archive has `split`/ images; the answer is cached beside the decoded splits, so a
        split already decoded loads without reading the archive at all."""
        listing = _cache_base(self.key, "splits").with_suffix(".splits.txt")
        if listing.exists():
            return split in listing.read_text().splitlines()
        splits = sorted({Path(m.name).parts[-3] for m in self.members if len(Path(m.name).parts) >= 3})
        try:
            listing.parent.mkdir(parents=True, exist_ok=True)
            with written_whole(listing) as tmp:
                tmp.write_text("\n".join(splits))
        except OSError:  # a read-only cache: listed again next time (`_cached` says so once it decodes)
            pass
        return split in splits

    def decode(self, split: str, image_size: int, progress: bool, keep=None, check=None) -> ImageSet:
        # read in the archive's own order (a step back in a .gz decompresses it again from the start), then
        # sorted by name, whatever order the archive was written in
        tops = sorted({p[:-3] for m in self.members
                       if len(p := Path(m.name).parts) >= 3 and p[-3] in ("train", "test", "val")})
        if len(tops) > 1:  # else their classes would be taken for one data set's
            raise ValueError(f"{self.path} holds split folders under more than one top folder "
                             f"({', '.join('/'.join(t) + '/' if t else './' for t in tops)}): give an archive of "
                             f"one tree")
        # a hidden class folder is left out, as of the tree (.ipynb_checkpoints/)
        members = [m for m in self.members if len(p := Path(m.name).parts) >= 3 and p[-3] == split
                   and not p[-2].startswith(".")]
        if not members:
            found = sorted({p[-3] + "/" for m in self.members if len(p := Path(m.name).parts) >= 3})
            if not any(f[:-1].lower() in ("train", "test", "val") for f in found):  # else taken for split folders
                raise ValueError(f"{self.path} holds no train/, test/ or val/ folder of class folders: archive the "
                                 f"class folders inside train/ (a test set inside test/), or unpack it and score a "
                                 f"flat tree of class folders with split 'all'")
            raise ValueError(f"{self.path} has no {split}/<class>/ images; its images are in {', '.join(found)} "
                             f"(split folders are train/, test/, val/, in lower case)")
        _refuse_one_class_twice({Path(m.name).parts[-2] for m in members}, f"{self.path}:{split}/")
        classes = sorted({composed_name(Path(m.name).parts[-2]) for m in members})
        folders = {p[-2] for m in self.every if not m.isdir() and len(p := Path(m.name).parts) >= 3 and p[-3] == split}
        folders |= {p[-1] for m in self.every if m.isdir() and len(p := Path(m.name).parts) >= 2 and p[-2] == split}
        folders = {composed_name(f) for f in folders if not f.startswith(".")}
        # an image below a class folder of the split folder (by its path: an archive need hold no folder members)
        tops = {Path(m.name).parts[:-2] for m in members}
        nested = next((m.name for m in self.members if len(p := Path(m.name).parts) >= 4 and any(
            p[:i] in tops and not p[i].startswith(".") and not p[i + 1].startswith(".") for i in range(1, len(p) - 2))),
            None)
        if nested:  # as a tree's: else left out without a word
            raise ValueError(f"{self.path}:{nested} is an image in a sub-folder of a {split}/ class folder, and a "
                             f"class's images are read from its own folder alone: archive them in the class folder")
        empty = sorted(folders - set(classes))
        if empty:  # as a tree's: a class left out would shift the others' labels without a word
            raise ValueError(f"class folder {self.path}:{split}/{empty[0]} {NO_IMAGES}")
        linked = sorted(p[-1] for m in self.every if m.issym() and len(p := Path(m.name).parts) >= 2 and p[-2] == split
                        and not p[-1].startswith(".") and self._target(m) is None)  # a link to no file: to a folder (or to nothing)
        if linked:  # the tree follows it to a class of its own; the archive holds none of its images
            raise ValueError(f"class folder {self.path}:{split}/{linked[0]} is a link, whose images the archive does "
                             f"not hold: archive the tree with its links followed (tar -h)")
        if check is not None:
            check(_no_images(classes, image_size))
        # class by class, each by file name, as the unpacked tree reads (sorting whole names would put
        # "sea-lion/" before "sea/", since "-" sorts before "/")
        names = sorted({m.name for m in members},
                       key=lambda n: (classes.index(composed_name(Path(n).parts[-2])), Path(n).name, n))
        labels = np.array([classes.index(composed_name(Path(n).parts[-2])) for n in names], dtype=np.int64)
        if keep is not None:
            chosen = keep(labels, tuple(classes))
            names, labels = [names[i] for i in chosen], labels[chosen]
        wanted = set(names)
        decoded = {}
        with _open_archive(self.path) as tar:
            for m in _progress([m for m in members if m.name in wanted], f"decoding {self.path.name}:{split}",
                               progress):
                target = self._target(m)
                if target is None:
                    raise ValueError(f"cannot read image {self.path}:{m.name}: a link to {m.linkname!r}, which is "
                                     f"no file of the archive")
                if target.name in decoded:  # a hard link to an image read already: no step back in the .gz
                    decoded[m.name] = decoded[target.name]
                else:
                    decoded[m.name] = _decode(tar.extractfile(target).read(), f"{self.path}:{m.name}", image_size)
        return ImageSet(np.stack([decoded[n] for n in names]), labels, tuple(classes))


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's python batches hold: numpy arrays and builtin containers."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


class _PickleSource(_Source):
    """torchvision's `cifar-10-batches-py`: data_batch_1..5, test_batch, batches.meta."""
    TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
    FILES = (*TRAIN, "test_batch", "batches.meta")

    def __init__(self, root: Path):
        self.root = root
        # its batches, which have no image ending: the tree's key would be the folder's path alone
        self.key = "|".join([str(root.resolve())] + [_stat_key(root / n) for n in self.FILES if (root / n).is_file()])

    def has(self, split: str) -> bool:
        return split in ("train", "test")

    def _load(self, name: str) -> dict:
        path = self.root / name
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is missing {name}")
        try:
            with open(path, "rb") as f:
                obj = _SafeUnpickler(f, encoding="bytes").load()
        except Exception as e:
            if isinstance(e, EOFError) or str(e) == "pickle data was truncated":  # empty, or cut short
                size = path.stat().st_size
                raise ValueError(f"{path} {'is empty' if not size else f'is cut short ({size:,} bytes)'}: download "
                                 f"and unpack CIFAR-10's python batches again") from None
            raise ValueError(f"{path} is not a CIFAR python batch ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path} is not a CIFAR python batch (holds a {type(obj).__name__})")
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}

    def decode(self, split: str, image_size: int, progress: bool, keep=None, check=None) -> ImageSet:
        if split not in ("train", "test"):
            raise ValueError(f"{self.root} holds train and test batches only")
        meta = self._load("batches.meta")
        classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", ()))
        if check is not None:
            check(_no_images(classes, image_size))
        images, labels = [], []
        for name in self.TRAIN if split == "train" else ("test_batch",):
            batch = self._load(name)
            data, lab = batch.get("data"), batch.get("labels")
            if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 \
                    or lab is None or len(lab) != len(data):
                raise ValueError(f"{self.root / name} is not a CIFAR python batch (bad data/labels)")
            try:
                lab = np.asarray(lab)
            except ValueError:  # a ragged list
                lab = np.asarray(None)
            # casting would wrap pixels beyond 8 bits and a label of -1 would pass for class 9 in a bincount
            if lab.ndim != 1 or lab.dtype.kind not in "iu" or (len(lab) and lab.min() < 0):
                raise ValueError(f"{self.root / name} is not a CIFAR python batch (labels are not class numbers)")
            if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
                raise ValueError(f"{self.root / name} is not a CIFAR python batch (pixels are not 8-bit values)")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(lab.astype(np.int64))
        images = np.ascontiguousarray(np.concatenate(images).astype(np.uint8))
        labels = np.concatenate(labels)
        if int(labels.max()) >= len(classes):  # a class absent from a subset's batches is no fault
            raise ValueError(f"{self.root}/batches.meta names {len(classes)} classes, "
                             f"labels go up to {int(labels.max())}")
        if keep is not None:
            chosen = keep(labels, classes)
            images, labels = images[chosen], labels[chosen]
        if image_size != 32:  # (a minute for the 50,000 training images at 224 pixels)
            images = np.stack([_resize(Image.fromarray(im), image_size)
                               for im in _progress(images, f"resizing {self.root.name}:{split}", progress)])
        return ImageSet(images, labels, classes)


# ----------------------------------------------------------------------------- decoding and cache

def _resize(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size`, then centre-crop to `size` x `size`."""
    w, h = img.size
    if max(w, h) > 4 * min(w, h):  # a sliver: only its centre survives the crop, so resize just that
        keep = 4 * min(w, h)
        img = img.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h) if w > h else
                       (0, (h - keep) // 2, w, (h - keep) // 2 + keep))
        w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def _read_file(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ValueError(f"image {path} is {size:,} bytes, over the {MAX_IMAGE_BYTES:,} an image file may be")
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read image {path} ({e.strerror or e})") from None


# PIL modes whose convert("RGB"/"RGBA") gives the colours shown (LAB, for one, would copy its channels as RGB)
_PIL_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LA", "PA", "RGBA", "RGBa"}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (I;16*), 32-bit integer (I) and float (F) grayscale as 8-bit (L), which PIL's convert("RGB") would
    clip (a 16-bit mid-grey turning white): 16-bit values divided by 257, whatever they are (dark stays dark), I as
    8-bit values where none exceeds 255, else as 16-bit, F in 0..1 or 0..255; values beyond those refused. Other
    modes as they are."""
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    a = np.asarray(img)
    if img.mode == "F":
        return Image.fromarray(float_to_8bit(a), "L")
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)  # an empty image is refused by its caller (the app's)
    if lo < 0 or hi > 65535:
        raise ValueError(f"integer image values must lie in 0..255 (8-bit) or 0..65535 (16-bit), got {lo}..{hi}")
    if img.mode != "I" or hi > 255:
        a = a // 257
    return Image.fromarray(a.astype(np.uint8), "L")


def float_to_8bit(a: np.ndarray) -> np.ndarray:
    """Float image values as uint8, for the data sets' images and the app's frames alike: 0..1 where none exceeds 1,
    else 0..255, rounded; NaN, infinite or other values refused."""
    if not np.isfinite(a).all():
        raise ValueError("the image holds NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise ValueError(f"float image values must lie in 0..1 or 0..255, got {lo:g}..{hi:g}")
    return np.clip(a * (255 if hi <= 1 else 1) + 0.5, 0, 255).astype(np.uint8)


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image as the 8-bit RGB the models see, for the data sets and the app alike: deep grayscale
    scaled (`_to_8bit`), other modes converted, transparent pixels composited over white; a mode whose
    conversion would garble its colours (LAB) refused."""
    img = _to_8bit(img)
    if img.mode not in _PIL_MODES:
        raise ValueError(f"images of PIL mode {img.mode!r} are not supported (give RGB, RGBA, L, P or CMYK)")
    if img.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return img.convert("RGB")


def _decode(data: bytes, name: str, image_size: int) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # a phone's photo upright, as shown (and as the app reads it)
        return _resize(pil_to_rgb(img), image_size)  # the app's pixels (app.frames)
    except UnidentifiedImageError:  # its own message names a BytesIO object, not the file
        raise ValueError(f"cannot decode image {name}: not in an image format PIL reads") from None
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:  # SyntaxError: PIL's broken PNG
        raise ValueError(f"cannot decode image {name}: {e}") from None


def _progress(items, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="img", disable=not enabled, leave=False)


def cache_dir() -> Path:
    """bitvit's cache folder, shared by every stage: $BITVIT_CACHE (`~` expanded; empty counts as unset), else
    ~/.cache/bitvit. A file there is refused, and so is `~` where this user has no home folder."""
    path = Path(os.environ.get("BITVIT_CACHE") or "~/.cache/bitvit")
    try:
        path = path.expanduser()
    except RuntimeError:  # no $HOME, and no home for this user id in the password database (a container's)
        raise ValueError(f"the cache folder {path} is under the home folder, and this user has none; set "
                         f"BITVIT_CACHE (or HOME) to a writable folder") from None
    if path.exists() and not path.is_dir():
        raise ValueError(f"the cache folder {path} ($BITVIT_CACHE) is a file; point BITVIT_CACHE at a folder")
    return path


# Raised whenever decoding changes what a source gives, so that copies decoded before are not read. 2 (2026-12-06):
# archives' class folders without images, images stored as links, and "sea-lion/" beside "sea/" read right. 3
# (2026-12-07): class names kept as JSON (a name holding a newline came back as two classes). 4 (2026-12-07): photos
# turned upright by their EXIF orientation. 5 (2026-12-07): transparent pixels white, not their stored colour. 6
# (2026-12-07): images in a class folder's sub-folders refused (they were left out). 7 (2026-12-07): 16-bit and
# 32-bit grayscale levels divided by 257 as the app's (they were rounded: one level up at times), float images
# beyond 0..255 refused (they were clipped); 8-bit images decode as before (CIFAR-10's JPEG copy: the same arrays).
# 8 (2026-12-07): .jfif and .jpe files read (an archive's were left out beside its .jpg files). 9 (2026-12-07):
# hidden folders beside the class folders left out (one holding images was a class). 10 (2026-12-07): class folder
# names composed (NFC; a Mac's decomposed "café/" was another name, sorted elsewhere). 11 (2026-12-07): an archive
# of trees under two top folders refused (their classes were merged). 12 (2026-12-07): class folders naming one class
# in two Unicode forms refused (an archive's were merged).
CACHE_VERSION = 12


def _cache_base(*parts: object) -> Path:
    """The cache's path stem (a suffix goes after it) for what `parts` identify."""
    return cache_dir() / "data" / hashlib.sha1(os.fsencode("|".join(map(str, parts)))).hexdigest()[:16]


def _cached(source: _Source, split: str, image_size: int, progress: bool, keep=None, alone=None,
            check=None) -> ImageSet:
    """A split decoded once and kept in the cache; a split the source lacks is refused by its `decode`.
    `keep(labels, classes)` picks the images to return by their indices; `alone` (what identifies the pick) has
    them decoded and cached apart unless the whole split is cached already: a few images of a big split (a
    --limit at 224x224 pixels) need not decode all of it. `check` goes to `decode`."""
    base = _cache_base(source.key, split, image_size, CACHE_VERSION)
    data = _read_cache(base, image_size)
    if data is None and alone is not None:
        base = _cache_base(source.key, split, image_size, CACHE_VERSION, *alone)
        data = _read_cache(base, image_size)
        if data is None:
            data = source.decode(split, image_size, progress, keep, check)
            _write_cache(base, data)
        return data
    if data is None:
        data = source.decode(split, image_size, progress, None, check)
        _write_cache(base, data)
    return data if keep is None else data.subset(keep(data.labels, data.classes))


def _read_cache(base: Path, image_size: int) -> ImageSet | None:
    """The copy cached under `base`, or None where there is none or it is damaged (which is said). Its SHA-256,
    written last, is checked on every read."""
    files = [base.with_suffix(s) for s in (".images.npy", ".labels.npy", ".classes.json", ".sha256")]
    if files[3].exists():
        try:
            images, labels = (np.load(f, allow_pickle=False) for f in files[:2])
            classes = tuple(json.loads(files[2].read_text()))  # a folder name may hold any character but /
            if (images.dtype == np.uint8 and images.shape[1:] == (image_size, image_size, 3)
                    and labels.shape == (len(images),) and files[3].read_text() == _digest(images, labels, classes)):
                return ImageSet(images, labels, classes)
        except Exception:  # truncated or damaged cache files (np.load's header parser raises its tokenizer's errors)
            pass
        print(f"the decoded copy in {base.parent} ({base.name}.*) is damaged: decoding again", file=sys.stderr)
    return None


def _write_cache(base: Path, data: ImageSet) -> None:
    """`data` cached under `base`; a cache that cannot be written is said, and left."""
    files = [base.with_suffix(s) for s in (".images.npy", ".labels.npy", ".classes.json", ".sha256")]
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        # each file replaced whole, the SHA-256 last: a copy another process wrote (the same, or a damaged one the
        # SHA-256 refuses) stays readable meanwhile, and one left half-written is refused by it
        for f, arr in zip(files[:2], (data.images, data.labels)):
            with written_whole(f) as tmp, open(tmp, "wb") as out:  # a file object: np.save adds no suffix
                np.save(out, arr)
        for f, text in zip(files[2:], (json.dumps(data.classes), _digest(data.images, data.labels, data.classes))):
            with written_whole(f) as tmp:
                tmp.write_text(text)
    except OSError as e:  # a read-only or full cache: this run goes on with the copy in memory
        print(f"warning: cannot keep the decoded copy in the cache folder {base.parent} ($BITVIT_CACHE): "
              f"{e.strerror or e}; it will be decoded again next time", file=sys.stderr)


def _digest(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> str:
    """SHA-256 of a decoded split (0.1 s for CIFAR-10's 45,000 training images)."""
    h = hashlib.sha256(np.ascontiguousarray(images).data)
    h.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    h.update(json.dumps(classes).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- model input

def normalize(x, mean, std):
    """(B, 3, H, W) floats in [0, 1] -> normalised with per-channel `mean` and `std`."""
    import torch
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def to_model_array(images: np.ndarray, mean, std) -> np.ndarray:
    """NumPy's `to_model_input`, for the runtimes that take arrays (ONNX Runtime, the app): uint8 RGB
    (B, H, W, 3) -> contiguous float32 (B, 3, H, W) normalised with `mean` and `std`."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def check_model_input(x, size: int) -> np.ndarray:
    """`x` if it is what a model runtime takes: normalised float32 images (B, 3, size, size), B >= 1, all
    finite; else one clear error."""
    try:
        x = np.asarray(x)
    except (TypeError, RuntimeError) as e:  # a torch tensor NumPy cannot read: bfloat16, needing grad, on a GPU
        raise ValueError(f"expected float32 input (B, 3, {size}, {size}) with B >= 1, got a {type(x).__name__} "
                         f"NumPy cannot read ({e})") from None
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != (3, size, size) or len(x) == 0:
        raise ValueError(f"expected float32 input (B, 3, {size}, {size}) with B >= 1, got {x.dtype} {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the input holds NaN or infinite values")
    return x


def to_model_input(images, mean, std, device=None):
    """(B, H, W, 3) uint8 array or tensor -> (B, 3, H, W) float tensor normalised with `mean`/`std`."""
    import torch
    x = torch.as_tensor(images, device=device)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) uint8 images, got {tuple(x.shape)} {x.dtype}")
    return normalize(x.permute(0, 3, 1, 2).float().div_(255), mean, std)
