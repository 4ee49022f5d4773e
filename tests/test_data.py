"""Data loading: every source format, the validation hold-out, the cache, and clear refusals."""
import dataclasses
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quant.augment import Augment, AugmentConfig, random_crop_flip
from quant.data import MAX_IMAGE_BYTES, ImageSet, cache_dir, load_split, to_model_input
from tests.conftest import TINY, write_tar, write_tree


def test_image_tree_loads_train_and_test_with_class_names(image_tree):
    train = load_split(image_tree, "trainval", image_size=16, progress=False)
    test = load_split(image_tree, "test", image_size=16, progress=False)
    assert train.images.shape == (18, 16, 16, 3) and train.images.dtype == np.uint8
    assert train.classes == TINY.classes == test.classes
    assert np.bincount(test.labels).tolist() == [6, 6, 6]


def test_data_must_have_the_models_classes_by_name_or_where_it_names_none_by_number():
    data = ImageSet(np.zeros((3, 16, 16, 3), np.uint8), np.arange(3), TINY.classes)
    assert data.require_classes(TINY) is data
    with pytest.raises(ValueError, match=r"the data's classes \['cat', 'dog', 'frog'\] are not the model's"):
        data.require_classes(dataclasses.replace(TINY, classes=("a", "b", "c")))
    with pytest.raises(ValueError, match="the data's 3 classes are not the model's 7"):
        data.require_classes(dataclasses.replace(TINY, num_classes=7, classes=()))


def test_data_of_some_of_the_models_classes_is_scored_with_the_models_class_indices():
    data = ImageSet(np.zeros((3, 16, 16, 3), np.uint8), np.array([0, 1, 1]), ("cat", "frog"))
    scored = data.scored_by(TINY)  # TINY's classes: cat, dog, frog
    assert scored.classes == TINY.classes and scored.labels.tolist() == [0, 2, 2]
    shuffled = ImageSet(data.images, np.array([0, 1, 2]), ("dog", "frog", "cat")).scored_by(TINY)
    assert shuffled.classes == TINY.classes and shuffled.labels.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="are not the model's"):  # training data must be the model's classes
        data.require_classes(TINY)
    with pytest.raises(ValueError, match="are not the model's"):  # a class the model has not
        ImageSet(data.images, data.labels, ("cat", "lion")).scored_by(TINY)


def test_a_class_the_model_names_twice_is_kept_as_given_or_refused_by_name():
    cfg = dataclasses.replace(TINY, classes=("crane", "dog", "crane"))  # a hub model's labels may repeat a name
    data = ImageSet(np.zeros((3, 16, 16, 3), np.uint8), np.array([0, 1, 2]), cfg.classes)
    assert data.scored_by(cfg).labels.tolist() == [0, 1, 2]  # labelled by the model's indices: kept
    with pytest.raises(ValueError, match=r"names the data's classes \['crane'\] more than once"):
        ImageSet(data.images[:2], np.array([0, 1]), ("dog", "crane")).scored_by(cfg)


def test_images_keep_their_colour_class(image_tree):
    data = load_split(image_tree, "test", image_size=16, progress=False)
    dominant = data.images.reshape(len(data), -1, 3).mean(1).argmax(1)
    assert (dominant == data.labels).all()


def test_tar_archive_reads_like_the_unpacked_tree(image_tree, image_tar):
    a = load_split(image_tree, "test", image_size=16, progress=False)
    b = load_split(image_tar, "test", image_size=16, progress=False)
    assert a.classes == b.classes
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images)


def test_an_archive_reads_in_the_trees_order_when_a_class_name_extends_another(tmp_path):
    tree = write_tree(tmp_path / "tree", splits=("test",), classes=("sea", "sea-lion", "sea_lion"), per_class=2)
    archive = write_tar(tree, tmp_path / "data.tar.gz", splits=("test",))
    a = load_split(tree, "test", image_size=16, progress=False)
    b = load_split(archive, "test", image_size=16, progress=False)
    assert a.classes == b.classes and a.labels.tolist() == b.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(a.images, b.images)


def test_an_archive_written_in_any_member_order_reads_like_the_tree_and_in_one_pass(image_tree, tmp_path,
                                                                                   monkeypatch):
    import random
    files = sorted(p for p in image_tree.rglob("*.jpg"))
    random.Random(0).shuffle(files)
    shuffled = tmp_path / "shuffled.tar.gz"
    with tarfile.open(shuffled, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=str(p.relative_to(image_tree)))
    offsets, extract = [], tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: offsets.append(m.offset) or extract(self, m))
    a = load_split(image_tree, "test", image_size=16, progress=False)
    b = load_split(shuffled, "test", image_size=16, progress=False)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images)
    assert offsets == sorted(offsets)  # never a step back, which a .gz pays for by decompressing from the start


def test_an_archives_linked_images_read_like_the_trees_in_one_pass(image_tree, tmp_path, monkeypatch):
    os.link(image_tree / "test" / "cat" / "0000.jpg", image_tree / "test" / "cat" / "0100.jpg")  # a duplicate
    os.symlink("0001.jpg", image_tree / "test" / "dog" / "0101.jpg")
    # the archive stores the second name of an inode as a hard link, and the symlink
    archive = write_tar(image_tree, tmp_path / "links.tar.gz", splits=("test",))
    offsets, extract = [], tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: offsets.append(m.offset) or extract(self, m))
    a = load_split(image_tree, "test", image_size=16, progress=False)
    b = load_split(archive, "test", image_size=16, progress=False)
    assert len(a) == 20 and np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images)
    assert offsets == sorted(offsets)  # the hard link's image is not read again from behind


@pytest.mark.parametrize("packed", [False, True])
def test_class_folders_named_in_decomposed_unicode_match_the_models_composed_names(tmp_path, packed):
    import unicodedata
    cfg = dataclasses.replace(TINY, classes=("zoo", "café", "été"))   # composed (NFC), as a model's names are
    # a tree copied from a Mac's HFS+ disk names its folders decomposed (NFD): "e" and a combining accent
    tree = write_tree(tmp_path / "t", splits=("test",), per_class=1,
                      classes=[unicodedata.normalize("NFD", c) for c in cfg.classes])
    data = write_tar(tree, tmp_path / "t.tar.gz", splits=("test",)) if packed else tree
    got = load_split(data, "test", image_size=16, progress=False)
    assert got.classes == ("café", "zoo", "été")   # in the order of a composed tree ("é" after "z", as a code point)
    assert got.scored_by(cfg).labels.tolist() == [1, 0, 2]


def test_a_model_trained_on_a_decomposed_tree_before_names_were_composed_still_scores_it(tmp_path):
    import unicodedata
    decomposed = [unicodedata.normalize("NFD", c) for c in ("café", "zoo", "été")]
    cfg = dataclasses.replace(TINY, classes=tuple(sorted(decomposed)))  # as the tree named and sorted its classes
    tree = write_tree(tmp_path / "t", splits=("test",), per_class=1, classes=decomposed)
    got = load_split(tree, "test", image_size=16, progress=False).scored_by(cfg)
    assert got.classes == cfg.classes and got.labels.tolist() == [0, 2, 1]   # café, zoo, été: the model's 0, 2, 1


def test_a_set_scored_by_a_model_of_decomposed_class_names_is_scored_by_it_again_unchanged(tmp_path):
    import unicodedata  # (quant.evaluate scores the split that load_split's check scored already)
    decomposed = [unicodedata.normalize("NFD", c) for c in ("café", "zoo", "été")]
    cfg = dataclasses.replace(TINY, classes=tuple(sorted(decomposed)))
    tree = write_tree(tmp_path / "t", splits=("test",), per_class=1, classes=decomposed)
    once = load_split(tree, "test", image_size=16, progress=False).scored_by(cfg)
    twice = once.scored_by(cfg)
    assert twice.classes == once.classes and twice.labels.tolist() == once.labels.tolist() == [0, 2, 1]


def test_a_teacher_trained_on_a_decomposed_tree_before_names_were_composed_still_names_its_classes(tmp_path):
    import unicodedata
    decomposed = [unicodedata.normalize("NFD", c) for c in ("café", "dog", "été")]   # sorted alike, either form
    cfg = dataclasses.replace(TINY, classes=tuple(decomposed))
    tree = write_tree(tmp_path / "t", splits=("test",), per_class=1, classes=decomposed)
    assert load_split(tree, "test", image_size=16, progress=False).require_classes(cfg).labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize("packed", [False, True])
def test_two_class_folders_naming_one_class_in_two_unicode_forms_are_refused_not_merged(tmp_path, packed):
    import unicodedata
    # "café/" composed beside a copy of it decomposed (NFD: "e" and a combining accent), as from a Mac's disk
    tree = write_tree(tmp_path / "t", splits=("test",), per_class=1,
                      classes=["café", unicodedata.normalize("NFD", "café"), "dog"])
    data = write_tar(tree, tmp_path / "t.tar.gz", splits=("test",)) if packed else tree
    with pytest.raises(ValueError, match=r"holds class folders 'cafe\\u0301' and 'caf\\xe9', one name in two "
                                         r"Unicode forms: merge or rename them$"):
        load_split(data, "test", image_size=16, progress=False)


def test_a_16_bit_image_in_a_tree_keeps_its_grey_level(tmp_path):
    tree = write_tree(tmp_path / "t", splits=("test",), per_class=1)
    grey = tree / "test" / TINY.classes[0] / "grey16.png"
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(grey)   # 32896 / 257 = 128
    data = load_split(tree, "test", image_size=16, progress=False)
    assert Image.open(grey).mode == "I;16" and (data.images[data.labels == 0][-1] == 128).all()


@pytest.mark.parametrize("make", [
    lambda: Image.fromarray(np.full((16, 16), 200 * 257 + 130, np.uint16)),   # 16-bit: 200.5 levels
    lambda: Image.fromarray(np.full((16, 16), 1000, np.int32)),               # 32-bit integers, 16-bit values
    lambda: Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)),
    lambda: Image.new("RGBA", (16, 16), (10, 200, 30, 100)), lambda: Image.new("LA", (16, 16), (77, 133)),
    lambda: Image.new("CMYK", (16, 16), (10, 80, 160, 20)), lambda: Image.new("RGB", (16, 16), "teal").convert("P")])
def test_an_image_scored_from_a_tree_and_uploaded_to_the_app_gives_the_same_pixels(tmp_path, make):
    from app.frames import load_image_file
    path = tmp_path / "tree" / "test" / "a" / "0.tif"
    path.parent.mkdir(parents=True)
    make().save(path)
    data = load_split(tmp_path / "tree", "test", image_size=16, progress=False).images[0]
    assert np.array_equal(data, load_image_file(path))


def test_a_float_image_beyond_0_to_255_is_refused_not_clipped_white(tmp_path):
    path = tmp_path / "tree" / "test" / "a" / "0.tif"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 300.0, np.float32)).save(path)
    with pytest.raises(ValueError, match=r"0\.tif: float image values must lie in 0..1 or 0..255, got 300..300"):
        load_split(tmp_path / "tree", "test", image_size=16, progress=False)


@pytest.mark.parametrize("values, says", [
    (np.full((16, 16), np.nan, np.float32), "the image holds NaN or infinite values"),
    (np.full((16, 16), 70_000, np.int32), r"integer image values must lie in 0..255 \(8-bit\) or 0..65535 \(16-bit\), "
                                          r"got 70000..70000"),
    (np.full((16, 16), -5, np.int32), r"integer image values must lie in .*, got -5..-5")])
def test_an_image_of_nan_or_of_integers_beyond_16_bits_is_refused_not_garbled(tmp_path, values, says):
    path = tmp_path / "tree" / "test" / "a" / "0.tif"
    path.parent.mkdir(parents=True)
    Image.fromarray(values).save(path)
    with pytest.raises(ValueError, match=rf"0\.tif: {says}"):
        load_split(tmp_path / "tree", "test", image_size=16, progress=False)


def test_an_archive_cut_within_its_first_bytes_is_named(image_tar, tmp_path):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(image_tar.read_bytes()[:20])
    with pytest.raises(ValueError, match="cut.tar.gz is a damaged or truncated archive"):
        load_split(cut, "test", image_size=16, progress=False)


def test_cifar_python_batches_load(cifar_batches):
    train = load_split(cifar_batches.parent, "trainval", progress=False)
    test = load_split(cifar_batches, "test", progress=False)
    assert train.images.shape == (100, 32, 32, 3) and test.images.shape == (20, 32, 32, 3)
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    with open(cifar_batches / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert np.array_equal(test.images[0], raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_batches_resized_to_a_larger_models_size_show_a_bar_of_every_image(cifar_batches, capsys):
    load_split(cifar_batches, "test", image_size=48, progress=True)  # silent for a minute at 224 pixels
    assert re.search(r"resizing cifar-10-batches-py:test: +0%\|[^|]*\| 0/20 ", capsys.readouterr().err)


def test_cifar_batches_without_their_first_batch_are_still_told_apart_from_an_image_tree(cifar_batches):
    (cifar_batches / "data_batch_1").unlink()
    assert len(load_split(cifar_batches, "test", progress=False)) == 20
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py is missing data_batch_1"):
        load_split(cifar_batches, "train", progress=False)


def test_hostile_pickle_is_refused_without_running_it(cifar_batches, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    with open(cifar_batches / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_split(cifar_batches, "test", progress=False)
    assert not (tmp_path / "pwned").exists()


def test_validation_split_is_the_last_images_of_each_class_and_disjoint_from_train(image_tree):
    full = load_split(image_tree, "trainval", image_size=16, progress=False)
    train = load_split(image_tree, "train", image_size=16, val_fraction=1 / 3, progress=False)
    val = load_split(image_tree, "val", image_size=16, val_fraction=1 / 3, progress=False)
    assert len(train) == 12 and len(val) == 6
    assert np.array_equal(val.images, full.images[[4, 5, 10, 11, 16, 17]])
    assert not (train.images[:, None] == val.images[None]).all(axis=(2, 3, 4)).any()


def test_limit_takes_a_balanced_subset(image_tree):
    data = load_split(image_tree, "test", image_size=16, limit=6, progress=False)
    assert np.bincount(data.labels).tolist() == [2, 2, 2]


@pytest.mark.parametrize("source, split", [("image_tree", "test"), ("image_tree", "val"), ("image_tar", "train"),
                                           ("image_tar", "trainval"), ("cifar_batches", "val")])
def test_a_limited_load_decodes_only_the_images_it_returns(source, split, request, monkeypatch):
    """A few images of a model's size (224x224) out of a big split: the whole split is not decoded first."""
    path = request.getfixturevalue(source)
    import quant.data
    resized, resize = [], quant.data._resize
    monkeypatch.setattr(quant.data, "_resize", lambda img, size: resized.append(1) or resize(img, size))
    limited = load_split(path, split, image_size=16, limit=4, progress=False)
    assert len(resized) == len(limited) <= 4  # (val holds 3 here)
    load_split(path, split, image_size=16, progress=False)  # the whole split, cached
    again = load_split(path, split, image_size=16, limit=4, progress=False)  # picked from the whole split's copy
    assert np.array_equal(limited.images, again.images) and np.array_equal(limited.labels, again.labels)
    assert limited.classes == again.classes


def test_a_limited_trainval_of_a_tree_with_its_own_val_folder_decodes_a_few_images_of_each(tmp_path, monkeypatch):
    """ImageNet's layout (train/, val/): 256 calibration images must not decode its 1.3 million."""
    tree = write_tree(tmp_path / "t", splits=("train", "val"), per_class=4)  # 12 images each
    import quant.data
    resized, resize = [], quant.data._resize
    monkeypatch.setattr(quant.data, "_resize", lambda img, size: resized.append(1) or resize(img, size))
    limited = load_split(tree, "trainval", image_size=16, limit=4, progress=False)
    assert len(resized) == 8  # each folder's own pick of 4, from which the 4 are taken
    load_split(tree, "trainval", image_size=16, progress=False)
    again = load_split(tree, "trainval", image_size=16, limit=4, progress=False)  # from the whole splits' copies
    assert np.array_equal(limited.images, again.images) and np.array_equal(limited.labels, again.labels)


def test_a_limited_trainval_of_a_tree_with_its_own_val_folder_holds_limit_images(tmp_path):
    tree = write_tree(tmp_path / "t", splits=("train", "val"), per_class=4)
    limited = load_split(tree, "trainval", image_size=16, limit=4, progress=False)
    assert len(limited) == 4 and np.bincount(limited.labels).tolist() == [2, 1, 1]


def test_a_limited_val_split_of_another_val_fraction_is_not_served_the_first_ones_cached_pick(image_tree):
    assert len(load_split(image_tree, "val", image_size=16, val_fraction=0.1, limit=4, progress=False)) == 3
    assert len(load_split(image_tree, "val", image_size=16, val_fraction=0.5, limit=4, progress=False)) == 4


def test_limited_train_and_val_splits_held_out_of_one_folder_are_cached_apart(image_tree):
    load_split(image_tree, "train", image_size=16, limit=4, progress=False)
    val = load_split(image_tree, "val", image_size=16, limit=4, progress=False)
    assert np.array_equal(val.images, load_split(image_tree, "val", image_size=16, progress=False).images)


OTHER = dataclasses.replace(TINY, classes=("a", "b", "c"))


@pytest.fixture
def tree_with_val(tmp_path) -> Path:
    """A tree with its own val/ folder: its trainval split is train/ and val/ together."""
    return write_tree(tmp_path / "tv", splits=("train", "val"))


@pytest.mark.parametrize("source, split", [("image_tree", "train"), ("image_tree", "val"), ("image_tar", "test"),
                                           ("image_tar", "trainval"), ("tree_with_val", "trainval"),
                                           ("cifar_batches", "train")])
@pytest.mark.parametrize("limit", [None, 4])
def test_data_a_models_check_refuses_is_refused_before_any_image_is_decoded(source, split, limit, request,
                                                                           no_decoding):
    """A model's classes are checked on the split's class names alone (a tree's folders, an archive's listing,
    batches.meta): data of other classes is refused in seconds, not after minutes of decoding 50,000 JPEGs."""
    with pytest.raises(ValueError, match="are not the model's"):
        load_split(request.getfixturevalue(source), split, image_size=16, limit=limit, progress=False,
                   check=lambda s: s.require_classes(OTHER))


def test_a_split_from_the_cache_is_checked_and_given_as_the_check_gives_it(image_tree):
    whole = load_split(image_tree, "test", image_size=16, progress=False)  # decoded and cached
    reordered = dataclasses.replace(TINY, classes=("frog", "dog", "cat"))
    again = load_split(image_tree, "test", image_size=16, progress=False, check=lambda s: s.scored_by(reordered))
    assert again.classes == reordered.classes and np.array_equal(again.labels, 2 - whole.labels)
    with pytest.raises(ValueError, match="are not the model's"):
        load_split(image_tree, "test", image_size=16, progress=False, check=lambda s: s.require_classes(OTHER))


def test_a_trainval_split_of_a_tree_with_val_is_given_as_the_check_gives_it(tmp_path):
    tree = write_tree(tmp_path / "t", splits=("train", "val"))
    plain = load_split(tree, "trainval", image_size=16, progress=False)
    reordered = dataclasses.replace(TINY, classes=("frog", "dog", "cat"))
    got = load_split(tree, "trainval", image_size=16, progress=False, check=lambda s: s.scored_by(reordered))
    assert got.classes == reordered.classes and np.array_equal(got.labels, 2 - plain.labels)


def test_second_load_comes_from_the_cache(image_tree, monkeypatch):
    first = load_split(image_tree, "test", image_size=16, progress=False)

    def no_decoding(*args):
        raise AssertionError("decoded again")
    monkeypatch.setattr("quant.data._decode", no_decoding)
    again = load_split(image_tree, "test", image_size=16, progress=False)
    assert np.array_equal(first.images, again.images) and again.classes == first.classes


def test_splits_already_decoded_load_without_reading_the_archive(image_tar, monkeypatch):
    first = {split: load_split(image_tar, split, image_size=16, progress=False) for split in ("train", "test")}

    def no_reading(*args):
        raise AssertionError("archive read again")
    monkeypatch.setattr("quant.data._open_archive", no_reading)
    for split in ("train", "val", "test"):  # val: the hold-out of the decoded train split
        again = load_split(image_tar, split, image_size=16, progress=False)
        assert split == "val" or np.array_equal(first[split].images, again.images)


def test_a_copy_that_another_process_writes_again_stays_readable_meanwhile(image_tree, monkeypatch, capsys):
    """Two processes decode a split at once (torchrun's ranks on an empty cache): while the later one writes
    its copy over the first one's, the first reads the split again from the cache, not by decoding it."""
    import quant.data
    decode, save, state = quant.data._FolderSource.decode, np.save, {"decodes": 0, "first_done": False}

    def decode_beside_another(self, *args):
        state["decodes"] += 1
        if state["decodes"] == 1:   # while this (the later) process decodes, the first decodes and keeps its copy
            load_split(image_tree, "test", image_size=16, progress=False)
            state["first_done"] = True
        return decode(self, *args)

    def save_while_read(out, arr):  # the later process writes; the first reads meanwhile
        if state["first_done"] and state["decodes"] == 2 and "read" not in state:
            state["read"] = load_split(image_tree, "test", image_size=16, progress=False)
        save(out, arr)
    monkeypatch.setattr(quant.data._FolderSource, "decode", decode_beside_another)
    monkeypatch.setattr(np, "save", save_while_read)
    load_split(image_tree, "test", image_size=16, progress=False)
    assert "read" in state and state["decodes"] == 2 and "damaged" not in capsys.readouterr().err


def test_a_split_decoded_by_an_older_version_of_the_decoder_is_decoded_again(image_tree, monkeypatch):
    import quant.data
    load_split(image_tree, "test", image_size=16, progress=False)
    monkeypatch.setattr(quant.data, "CACHE_VERSION", quant.data.CACHE_VERSION + 1)
    decode, decoded = quant.data._decode, []
    monkeypatch.setattr(quant.data, "_decode", lambda *args: decoded.append(args) or decode(*args))
    load_split(image_tree, "test", image_size=16, progress=False)
    assert decoded


def test_a_damaged_cache_is_decoded_again(image_tree, capsys):
    first = load_split(image_tree, "test", image_size=16, progress=False)
    cached = next((cache_dir() / "data").glob("*.images.npy"))
    cached.write_bytes(cached.read_bytes()[:200])   # truncated
    again = load_split(image_tree, "test", image_size=16, progress=False)
    assert np.array_equal(first.images, again.images)
    assert "damaged: decoding again" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".images.npy", ".labels.npy", ".classes.json"])
def test_a_cache_damaged_without_changing_its_size_is_decoded_again_not_used(image_tree, capsys, suffix):
    first = load_split(image_tree, "test", image_size=16, progress=False)
    cached = next((cache_dir() / "data").glob(f"*{suffix}"))
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0x01  # one bit of the last image, label or class name
    cached.write_bytes(bytes(data))
    again = load_split(image_tree, "test", image_size=16, progress=False)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.labels, again.labels)
    assert again.classes == first.classes and "damaged: decoding again" in capsys.readouterr().err


def test_a_cache_whose_array_header_is_damaged_is_decoded_again(image_tree, capsys):
    first = load_split(image_tree, "test", image_size=16, progress=False)
    cached = next((cache_dir() / "data").glob("*.images.npy"))
    cached.write_bytes(cached.read_bytes().replace(b"3)", b"3(", 1))   # the shape's closing bracket
    again = load_split(image_tree, "test", image_size=16, progress=False)
    assert np.array_equal(first.images, again.images) and "damaged: decoding again" in capsys.readouterr().err


def test_an_empty_cache_setting_means_the_default_and_a_tilde_is_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("BITVIT_CACHE", "")
    assert cache_dir() == tmp_path / ".cache" / "bitvit"
    monkeypatch.setenv("BITVIT_CACHE", "~/elsewhere")
    assert cache_dir() == tmp_path / "elsewhere"


def test_a_cache_setting_naming_a_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path / "f"))
    with pytest.raises(ValueError, match="is a file; point BITVIT_CACHE at a folder"):
        cache_dir()


def test_a_cache_under_a_home_folder_the_user_lacks_is_one_error_saying_to_set_bitvit_cache(monkeypatch):
    monkeypatch.delenv("HOME")
    monkeypatch.setenv("BITVIT_CACHE", "")
    monkeypatch.setattr("pwd.getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))  # a container's user id
    with pytest.raises(ValueError, match=r"~/.cache/bitvit is under the home folder.*set BITVIT_CACHE"):
        cache_dir()


def test_changed_file_invalidates_the_cache(image_tree):
    load_split(image_tree, "test", image_size=16, progress=False)
    (image_tree / "test" / "dog" / "0000.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="0000.jpg"):
        load_split(image_tree, "test", image_size=16, progress=False)


def test_an_image_replaced_by_one_of_the_same_size_and_modification_time_is_decoded_again(tmp_path):
    tree, st = tmp_path / "tree", None
    for colour in ("red", "blue"):  # BMPs of one size; the second written over the first keeps its mtime (cp -p)
        path = tree / "test" / "a" / "0.bmp"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), colour).save(path)
        if st:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        st = path.stat()
        data = load_split(tree, "test", image_size=16, progress=False)
    assert tuple(data.images[0, 0, 0]) == (0, 0, 255)


def test_an_archive_replaced_by_one_of_the_same_size_and_modification_time_is_decoded_again(tmp_path):
    archive, st = tmp_path / "data.tar", None
    for colour in ("red", "blue"):  # uncompressed archives of one size; the second keeps the first's mtime (cp -p)
        image = tmp_path / colour / "test" / "a" / "0.bmp"
        image.parent.mkdir(parents=True)
        Image.new("RGB", (16, 16), colour).save(image)
        with tarfile.open(archive, "w") as tar:
            tar.add(image, arcname="test/a/0.bmp")
        if st:
            os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert archive.stat().st_size == st.st_size
        st = archive.stat()
        data = load_split(archive, "test", image_size=16, progress=False)
    assert tuple(data.images[0, 0, 0]) == (0, 0, 255)


def test_a_tree_spelt_another_way_comes_from_the_cache(image_tree, tmp_path, monkeypatch):
    load_split(image_tree, "test", image_size=16, progress=False)
    monkeypatch.setattr("quant.data._decode", lambda *args: pytest.fail("decoded again"))
    os.symlink(tmp_path, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    for spelt in ("./tree/", "link/tree/", tmp_path / "link" / "tree" / "test" / ".."):
        assert len(load_split(spelt, "test", image_size=16, progress=False)) == 18


def test_other_sizes_are_resized_and_centre_cropped(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255                                   # a white centre square in a 40x20 frame
    (tmp_path / "wide" / "test" / "a").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "wide" / "test" / "a" / "0.png")
    data = load_split(tmp_path / "wide", "test", image_size=16, progress=False)
    assert data.images.shape == (1, 16, 16, 3)
    assert data.images[0, :, 1:-1].min() > 200           # the crop kept the centre: white nearly edge to edge


def test_a_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    img = np.zeros((16, 32, 3), np.uint8)
    img[:, :16, 0] = img[:, 16:, 2] = 255                 # stored wide: red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6                                       # "rotate 90 degrees clockwise to view": red on top
    (tmp_path / "tree" / "test" / "a").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "tree" / "test" / "a" / "0.jpg", exif=exif, quality=95)
    data = load_split(tmp_path / "tree", "test", image_size=16, progress=False).images[0].astype(int)
    assert (data[:6, :, 0] > 200).all() and (data[-6:, :, 2] > 200).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_white_as_the_app_reads_them_not_their_stored_colour(tmp_path, mode):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (200, 0, 0, 255)                         # an opaque red left half; the right half transparent black
    img, path = Image.fromarray(rgba, "RGBA"), tmp_path / "tree" / "test" / "a" / "0.png"
    path.parent.mkdir(parents=True)
    if mode == "P":                                        # a palette image whose black entry is transparent
        img = img.convert("RGB").convert("P")
        img.save(path, transparency=img.getpixel((15, 0)))
    else:
        img.convert(mode).save(path)
    data = load_split(tmp_path / "tree", "test", image_size=16, progress=False).images[0]
    assert (data[:, 10:] == 255).all() and (data[:, :6] != 255).any()


def test_a_sliver_image_is_resized_from_its_centre_not_blown_up_whole(monkeypatch):
    from quant.data import _resize
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize",
                        lambda self, size, *a, **k: sizes.append(size) or resize(self, size, *a, **k))
    sliver = np.zeros((1, 100_000, 3), np.uint8)
    sliver[:, 50_000 - 2: 50_000 + 2] = 255   # a white centre
    out = _resize(Image.fromarray(sliver), 32)
    assert out.shape == (32, 32, 3) and out[:, 14:18].min() > 0
    assert sizes and max(w * h for w, h in sizes) <= 4 * 32 * 32   # not 3.2 million x 32


def test_an_archive_image_larger_than_any_image_file_is_refused_before_it_is_read(tmp_path):
    """A .tar.gz of a few MB can unpack to a member of gigabytes of zeros named .jpg, which was read whole."""
    head = tarfile.TarInfo("train/a/x.jpg")
    head.size = MAX_IMAGE_BYTES + 1
    path = tmp_path / "big.tar"
    with open(path, "wb") as f:
        f.write(head.tobuf())
        f.truncate(512 + (head.size + 511) // 512 * 512 + 1024)  # sparse: its data and end blocks, all zeros
    with pytest.raises(ValueError, match=f"image {path}:train/a/x.jpg is 1,073,741,825 bytes, over the "
                                         f"1,073,741,824 an image file may be"):
        load_split(path, "train")


def test_a_tree_image_larger_than_any_image_file_is_refused_before_it_is_read(image_tree):
    big = image_tree / "test" / "cat" / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse
    with pytest.raises(ValueError, match=f"image {big} is 1,073,741,825 bytes, over the 1,073,741,824 an image "
                                         f"file may be"):
        load_split(image_tree, "test")


def test_a_truncated_archive_is_named(image_tar, tmp_path):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(image_tar.read_bytes()[:len(image_tar.read_bytes()) // 2])
    with pytest.raises(ValueError, match="cut.tar.gz is a damaged or truncated archive"):
        load_split(cut, "test", image_size=16, progress=False)


def plain_tar(image_tree, path) -> list[tarfile.TarInfo]:
    """Write the test split of `image_tree` as an uncompressed tar at `path`; its members."""
    with tarfile.open(path, "w") as tar:
        tar.add(image_tree / "test", arcname="test")
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_an_archive_cut_within_a_members_header_is_named_not_read_short(image_tree, tmp_path):
    last = plain_tar(image_tree, tmp_path / "data.tar")[-1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "data.tar").read_bytes()[:last.offset + 100])   # tarfile would list all but the last image
    with pytest.raises(ValueError, match="cut.tar is a damaged or truncated archive"):
        load_split(cut, "test", image_size=16, progress=False)


def test_an_archive_with_a_damaged_members_header_is_named_not_read_short(image_tree, tmp_path):
    damaged = tmp_path / "damaged.tar"
    offset = plain_tar(image_tree, damaged)[5].offset
    data = bytearray(damaged.read_bytes())
    data[offset] ^= 0x01                     # a bit of a name: its checksum fails, and tarfile stops listing there
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged.tar is a damaged or truncated archive"):
        load_split(damaged, "test", image_size=16, progress=False)


def test_a_limit_below_one_image_is_refused(image_tree):
    with pytest.raises(ValueError, match="positive number of images"):
        load_split(image_tree, "test", image_size=16, limit=0, progress=False)


@pytest.mark.parametrize("fraction", [0, -0.5, 1.0, float("nan"), "0.1"])
def test_a_val_fraction_outside_zero_to_one_is_refused_naming_it(image_tree, fraction):
    with pytest.raises(ValueError, match="val_fraction must be a fraction .* between 0 and 1"):
        load_split(image_tree, "val", image_size=16, val_fraction=fraction, progress=False)


def test_an_image_size_below_one_pixel_is_refused_naming_it_not_the_first_image(image_tree):
    with pytest.raises(ValueError, match="image_size must be a positive number of pixels, got 0"):
        load_split(image_tree, "test", image_size=0, progress=False)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_split(tmp_path / "nope", "test")


def test_a_data_path_that_is_neither_file_nor_folder_is_named_as_such(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="pipe is neither a file nor a folder"):
        load_split(fifo, "test", progress=False)


def test_a_folder_of_neither_splits_nor_class_folders_is_not_told_to_move_its_class_folders(image_tar, tmp_path):
    holder = tmp_path / "holder"  # the folder holding the archive, given in its place
    holder.mkdir()
    image_tar.rename(holder / image_tar.name)
    with pytest.raises(ValueError, match="holder holds no train/ or test/ folder, nor class folders") as e:
        load_split(holder, "test", progress=False)
    assert "move them" not in str(e.value)


def test_a_folder_holding_the_tree_one_level_down_names_that_folder_not_a_class_to_move(tmp_path):
    write_tree(tmp_path / "outer" / "cifar10")
    for split in ("test", "all"):
        with pytest.raises(ValueError, match="outer holds no train/ or test/ folder, but .*outer/cifar10 does: give "
                                             "that folder"):
            load_split(tmp_path / "outer", split, image_size=16, progress=False)


def test_empty_class_folder_is_named(image_tree):
    (image_tree / "test" / "zebra").mkdir()
    with pytest.raises(ValueError, match="zebra holds no images"):
        load_split(image_tree, "test", progress=False)


@pytest.mark.parametrize("kind", ["empty folder", "no image files"])
def test_an_archives_class_folder_without_images_is_refused_as_a_trees_is(image_tree, tmp_path, kind):
    zebra = image_tree / "test" / "zebra"
    zebra.mkdir()
    if kind == "no image files":
        (zebra / "notes.txt").write_text("no images here")
    archive = write_tar(image_tree, tmp_path / "zebra.tar.gz", splits=("test",))
    with pytest.raises(ValueError, match="zebra holds no images"):
        load_split(archive, "test", progress=False)


@pytest.mark.parametrize("packed", [False, True])
def test_a_class_folder_of_images_in_a_format_not_read_names_the_endings_read(image_tree, tmp_path, packed):
    (image_tree / "test" / "zebra").mkdir()
    (image_tree / "test" / "zebra" / "z.qoi").write_bytes(b"qoif" + (16).to_bytes(4, "big") * 2 + bytes([3, 0]))
    data = write_tar(image_tree, tmp_path / "z.tar.gz", splits=("test",)) if packed else image_tree
    with pytest.raises(ValueError, match=r"zebra holds no images \(files ending \.jpg, .*\.tiff; others, such as "
                                         r"\.qoi, are not read\)"):
        load_split(data, "test", progress=False)


@pytest.mark.parametrize("packed", [False, True])
def test_jpegs_ending_jfif_or_jpe_are_read_as_images(image_tree, tmp_path, packed):
    (image_tree / "test" / "cat" / "0000.jpg").rename(image_tree / "test" / "cat" / "0000.jfif")
    (image_tree / "test" / "dog" / "0000.jpg").rename(image_tree / "test" / "dog" / "0000.JPE")
    data = write_tar(image_tree, tmp_path / "j.tar.gz", splits=("test",)) if packed else image_tree
    assert np.bincount(load_split(data, "test", image_size=16, progress=False).labels).tolist() == [6, 6, 6]


@pytest.mark.parametrize("packed", [False, True])
def test_hidden_folders_beside_the_class_folders_are_left_out_not_taken_for_classes(image_tree, tmp_path, packed):
    (image_tree / "test" / ".ipynb_checkpoints").mkdir()                  # empty: was refused as a class of none
    (image_tree / "test" / ".thumbs").mkdir()
    Image.new("RGB", (16, 16)).save(image_tree / "test" / ".thumbs" / "0.jpg")   # was a class of its own
    (image_tree / "test" / ".thumbs" / "small").mkdir()   # not a class's sub-folder of images either
    Image.new("RGB", (16, 16)).save(image_tree / "test" / ".thumbs" / "small" / "0.jpg")
    os.symlink("cat", image_tree / "test" / ".latest")   # nor a class folder linked to
    data = write_tar(image_tree, tmp_path / "h.tar.gz", splits=("test",)) if packed else image_tree
    got = load_split(data, "test", image_size=16, progress=False)
    assert got.classes == TINY.classes and len(got) == 18


def test_a_folder_named_like_an_image_is_left_out_of_a_tree_as_of_its_archive(image_tree, tmp_path):
    (image_tree / "test" / "cat" / "x.jpg").mkdir()
    (image_tree / "test" / "cat" / "x.jpg" / "notes.txt").write_text("")  # no image: its images would be refused
    archive = write_tar(image_tree, tmp_path / "t.tar.gz", splits=("test",))
    tree, packed = (load_split(p, "test", image_size=16, progress=False) for p in (image_tree, archive))
    assert len(tree) == 18 and tree.classes == packed.classes
    assert (tree.images == packed.images).all() and (tree.labels == packed.labels).all()


def test_a_file_named_only_by_an_image_ending_is_left_out_of_an_archive_as_of_its_tree(image_tree, tmp_path):
    (image_tree / "test" / "cat" / "0000.jpg").rename(image_tree / "test" / "cat" / ".jpg")
    archive = write_tar(image_tree, tmp_path / "t.tar.gz", splits=("test",))
    tree, packed = (load_split(p, "test", image_size=16, progress=False) for p in (image_tree, archive))
    assert len(packed) == len(tree) == 17 and (tree.images == packed.images).all()


@pytest.mark.parametrize("packed", [False, True])
def test_macos_hidden_metadata_files_beside_the_images_are_left_out(image_tree, tmp_path, packed):
    expected = load_split(image_tree, "test", image_size=16, progress=False)
    for image in list((image_tree / "test").rglob("*.jpg")):   # AppleDouble files: no image, though named .jpg
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07" + bytes(78))
    data = write_tar(image_tree, tmp_path / "mac.tar.gz", splits=("test",)) if packed else image_tree
    got = load_split(data, "test", image_size=16, progress=False)
    assert np.array_equal(got.labels, expected.labels) and np.array_equal(got.images, expected.images)


def test_any_hidden_image_file_is_left_out_not_only_macos_metadata(image_tree):
    expected = load_split(image_tree, "test", image_size=16, progress=False)
    image = next((image_tree / "test").rglob("*.jpg"))
    (image.parent / ".cover.jpg").write_bytes(image.read_bytes())   # a real image, but hidden
    assert len(load_split(image_tree, "test", image_size=16, progress=False)) == len(expected)


@pytest.mark.parametrize("packed", [False, True])
def test_images_in_a_sub_folder_of_a_class_folder_are_refused_not_left_out(image_tree, tmp_path, packed):
    (image_tree / "test" / "cat" / "2019").mkdir()
    (image_tree / "test" / "cat" / "0000.jpg").rename(image_tree / "test" / "cat" / "2019" / "0000.jpg")
    data = write_tar(image_tree, tmp_path / "nested.tar.gz", splits=("test",)) if packed else image_tree
    with pytest.raises(ValueError, match=r"sub-folder.*class's images are read from its own folder alone"):
        load_split(data, "test", progress=False)


def test_a_class_of_images_in_a_sub_folder_alone_is_refused_in_an_archive_without_folder_members(image_tree, tmp_path):
    (image_tree / "test" / "frog" / "2019").mkdir()
    for image in list((image_tree / "test" / "frog").glob("*.jpg")):   # no image left in frog/ itself
        image.rename(image.parent / "2019" / image.name)
    with tarfile.open(tmp_path / "files.tar.gz", "w:gz") as tar:          # files alone, as tar of `find -type f`
        for image in sorted((image_tree / "test").rglob("*.jpg")):
            tar.add(image, arcname=str(image.relative_to(image_tree)))
    with pytest.raises(ValueError, match=r"sub-folder.*class's images are read from its own folder alone"):
        load_split(tmp_path / "files.tar.gz", "test", progress=False)


@pytest.mark.parametrize("packed", [False, True])
def test_a_hidden_sub_folder_of_a_class_folder_is_left_out_as_hidden_files_are(image_tree, tmp_path, packed):
    expected = load_split(image_tree, "test", image_size=16, progress=False)
    for d in (image_tree / "test").iterdir():  # a NAS's or netatalk's metadata folder beside the images
        (d / ".AppleDouble").mkdir()
        (d / ".AppleDouble" / "0000.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(78))
    data = write_tar(image_tree, tmp_path / "hidden.tar.gz", splits=("test",)) if packed else image_tree
    got = load_split(data, "test", image_size=16, progress=False)
    assert np.array_equal(got.labels, expected.labels) and np.array_equal(got.images, expected.images)


@pytest.mark.parametrize("packed", [False, True])
def test_images_two_folders_deep_in_a_class_folder_are_refused_too(image_tree, tmp_path, packed):
    (image_tree / "test" / "cat" / "2019" / "jan").mkdir(parents=True)
    (image_tree / "test" / "cat" / "0000.jpg").rename(image_tree / "test" / "cat" / "2019" / "jan" / "0000.jpg")
    data = write_tar(image_tree, tmp_path / "nested.tar.gz", splits=("test",)) if packed else image_tree
    with pytest.raises(ValueError, match=r"sub-folder.*class's images are read from its own folder alone"):
        load_split(data, "test", progress=False)


def test_an_archive_whose_top_folder_is_named_like_a_split_is_not_taken_for_nested_images(image_tree, tmp_path):
    archive = tmp_path / "wrapped.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # test/train/cat/0000.jpg, test/test/cat/0000.jpg..., files alone
        for image in sorted(image_tree.rglob("*.jpg")):
            tar.add(image, arcname=f"test/{image.relative_to(image_tree)}")
    got = load_split(archive, "test", image_size=16, progress=False)
    assert np.array_equal(got.images, load_split(image_tree, "test", image_size=16, progress=False).images)


@pytest.mark.parametrize("packed", [False, True])
def test_capitalised_split_folders_are_named_with_the_names_to_give(image_tree, tmp_path, packed):
    for split in ("train", "test"):
        (image_tree / split).rename(image_tree / split.capitalize())
    data = write_tar(image_tree, tmp_path / "t.tar.gz", splits=("Train", "Test")) if packed else image_tree
    with pytest.raises(ValueError, match=r"Test/, Train/.*split folders are .*train/, test/, val/.*lower case"):
        load_split(data, "train", image_size=16, progress=False)


def test_an_archives_class_folder_stored_as_a_link_is_refused_not_left_out(image_tree, tmp_path):
    (image_tree / "test" / "zebra").symlink_to("cat", target_is_directory=True)  # the tree reads it as a class
    # which the archive keeps as a link, holding none of its images
    archive = write_tar(image_tree, tmp_path / "linked.tar.gz", splits=("test",))
    assert load_split(image_tree, "test", image_size=16, progress=False).classes == ("cat", "dog", "frog", "zebra")
    with pytest.raises(ValueError, match="class folder .*zebra is a link"):
        load_split(archive, "test", image_size=16, progress=False)


def test_undecodable_image_is_named(image_tree):
    (image_tree / "test" / "dog" / "0003.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"cannot decode image .*dog/0003\.jpg"):
        load_split(image_tree, "test", progress=False)


def test_undecodable_image_message_names_the_file_not_a_buffer(image_tree):
    (image_tree / "test" / "dog" / "0003.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="not in an image format") as e:
        load_split(image_tree, "test", progress=False)
    assert "BytesIO" not in str(e.value)


def test_an_image_too_large_to_decode_safely_is_named(image_tree, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 16x16 test images count as decompression bombs
    with pytest.raises(ValueError, match=r"cannot decode image .*\.jpg.*decompression bomb"):
        load_split(image_tree, "test", progress=False)


def test_a_png_whose_chunk_length_is_damaged_is_named_not_a_syntax_error(image_tree):
    import io
    import struct
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(png, "PNG")
    data = bytearray(png.getvalue())
    data[33:37] = struct.pack(">I", struct.unpack(">I", data[33:37])[0] - 8)  # IDAT's length: the next chunk misread
    (image_tree / "test" / "cat" / "0006.png").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"cannot decode image .*cat/0006\.png: broken PNG file"):
        load_split(image_tree, "test", progress=False)


def test_truncated_image_is_named(image_tree):
    f = image_tree / "test" / "frog" / "0001.jpg"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="frog/0001.jpg"):
        load_split(image_tree, "test", progress=False)


def test_unknown_split_is_refused(image_tree):
    with pytest.raises(ValueError, match="unknown split"):
        load_split(image_tree, "holdout")


def test_a_split_a_flat_class_tree_lacks_is_refused_naming_the_tree_and_the_split_to_use(tmp_path):
    tree = write_tree(tmp_path / "flat", splits=("",))
    with pytest.raises(ValueError,
                       match="flat has no train/ or test/ folder.*into .*flat/train/ .*to train on them.*split 'all'"):
        load_split(tree, "test")


@pytest.mark.parametrize("top", ["", "flat/"])
def test_an_archive_of_class_folders_without_split_folders_says_so_not_that_its_top_folder_is_a_split(tmp_path, top):
    tree = write_tree(tmp_path / "flat", splits=("",))
    archive = tmp_path / "flat.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=top or ".")
    for split in ("test", "all"):
        with pytest.raises(ValueError, match=r"flat.tar.gz holds no train/, test/ or val/ folder of class folders: "
                                             r"archive .* inside train/ .*or unpack it .* with split 'all'"):
            load_split(archive, split, progress=False)


@pytest.mark.parametrize("tops", [("a/", "b/"), ("", "b/"), ("a/", "a/"), ("", "")])
def test_an_archive_of_trees_under_two_top_folders_is_refused_naming_both_not_merged(image_tree, tmp_path, tops):
    archive = tmp_path / "two.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # cat's and frog's images under one top folder, dog's under another
        for image in sorted(image_tree.rglob("*.jpg")):
            tar.add(image, arcname=tops[image.parent.name == "dog"] + str(image.relative_to(image_tree)))
    if tops[0] == tops[1]:  # one tree, under a top folder or none: read as it is
        assert len(load_split(archive, "test", image_size=16, progress=False)) == 18
    else:
        with pytest.raises(ValueError, match=rf"two.tar.gz holds split folders under more than one top folder "
                                             rf"\({tops[0] or './'}, b/\): give an archive "
                                             rf"of one tree"):
            load_split(archive, "test", image_size=16, progress=False)


def test_model_input_is_normalised_nchw():
    x = to_model_input(np.full((2, 4, 4, 3), 255, np.uint8), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert x.shape == (2, 3, 4, 4) and torch.allclose(x, torch.full_like(x, 2.0))


def test_model_input_refuses_wrong_layout():
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\) uint8"):
        to_model_input(np.zeros((2, 3, 4, 4), np.uint8), (0.5,) * 3, (0.5,) * 3)


def test_augment_gives_normalised_images_and_soft_targets():
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    x, target = Augment(AugmentConfig(), 3, (0.5,) * 3, (0.5,) * 3)(images, torch.arange(8) % 3)
    assert x.shape == (8, 3, 16, 16) and target.shape == (8, 3)
    assert torch.allclose(target.sum(1), torch.ones(8))
    assert x.min() >= -1.0 - 1e-5 and x.max() <= 1.0 + 1e-5


def test_crop_shifts_content_without_changing_it():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = random_crop_flip(x, padding=2, flip=False)
    # each output image is a shifted window of the reflect-padded input
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="reflect")
    for b in range(2):
        assert any(torch.equal(out[b], padded[b, :, i:i + 8, j:j + 8]) for i in range(5) for j in range(5))


def test_an_unreadable_image_file_is_named(image_tree):
    (image_tree / "test" / "dog" / "0009.jpg").symlink_to(image_tree / "nowhere.jpg")
    with pytest.raises(ValueError, match=r"cannot read .*dog/0009\.jpg"):
        load_split(image_tree, "test", progress=False)


def test_a_dangling_link_that_is_no_image_is_ignored_like_other_files_that_are_not(image_tree):
    (image_tree / "test" / "dog" / "notes.txt").symlink_to(image_tree / "nowhere.txt")
    assert len(load_split(image_tree, "test", progress=False)) == len(list((image_tree / "test").glob("*/*.jpg")))


def test_an_image_that_cannot_be_read_while_decoding_is_named(image_tree, monkeypatch):
    real = Path.read_bytes

    def refuse(self):
        if self.name == "0001.jpg" and self.parent.name == "frog":
            raise PermissionError(13, "Permission denied")
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ValueError, match=r"cannot read image .*frog/0001\.jpg \(Permission denied\)"):
        load_split(image_tree, "test", progress=False)


def test_validation_holds_out_at_least_one_image_of_a_small_class(tmp_path):
    tree = write_tree(tmp_path / "t", per_class=3)                  # 10 % of 3 rounds to 0
    val = load_split(tree, "val", image_size=16, progress=False)
    train = load_split(tree, "train", image_size=16, progress=False)
    assert np.bincount(val.labels).tolist() == [1, 1, 1] and np.bincount(train.labels).tolist() == [2, 2, 2]


def test_a_class_too_small_to_hold_out_a_validation_image_is_refused(tmp_path):
    tree = write_tree(tmp_path / "t", per_class=1)
    with pytest.raises(ValueError, match=f"class '{TINY.classes[0]}' has 1 training images, too few to hold out 1"):
        load_split(tree, "train", image_size=16, progress=False)


def test_split_all_on_a_tree_of_split_folders_is_refused_naming_the_splits(image_tree):
    with pytest.raises(ValueError, match="holds split folders .*split 'all' scores a tree of class folders alone"):
        load_split(image_tree, "all", image_size=16, progress=False)


def test_cifars_python_archive_not_unpacked_is_named_with_what_to_do(cifar_batches, tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_batches, arcname="cifar-10-batches-py")
    with pytest.raises(ValueError, match="is CIFAR-10's python archive: unpack it"):
        load_split(archive, "test", progress=False)


def test_trainval_of_a_tree_with_its_own_val_folder_holds_both(tmp_path):
    tree = write_tree(tmp_path / "t", splits=("train", "val", "test"), per_class=4)
    trainval = load_split(tree, "trainval", image_size=16, progress=False)
    val = load_split(tree, "val", image_size=16, progress=False)
    assert len(trainval) == 24 and np.array_equal(trainval.images[12:], val.images)


def test_cifar_batches_whose_meta_names_too_few_classes_are_refused(cifar_batches):
    with open(cifar_batches / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane", b"automobile"]}, f, protocol=2)
    with pytest.raises(ValueError, match="names 2 classes, labels go up to 9"):
        load_split(cifar_batches, "test", progress=False)


def test_cifar_batches_in_which_a_class_is_absent_still_load_with_every_class_the_meta_names(cifar_batches):
    with open(cifar_batches / "test_batch", "wb") as f:   # a subset holding no truck (class 9)
        pickle.dump({b"labels": [i % 9 for i in range(20)], b"data": np.zeros((20, 3072), np.uint8)}, f, protocol=2)
    test = load_split(cifar_batches, "test", progress=False)
    assert len(test.classes) == 10 and test.classes[9] == "truck" and test.labels.max() == 8


@pytest.mark.parametrize("labels, data", [
    ([-1] + [i % 10 for i in range(19)], np.zeros((20, 3072), np.uint8)),     # a label no class has
    ([0.5] + [i % 10 for i in range(19)], np.zeros((20, 3072), np.uint8)),    # a label that is not an integer
    ([i % 10 for i in range(20)], np.full((20, 3072), 300, np.int64)),         # pixels beyond 8 bits
    ([i % 10 for i in range(20)], np.full((20, 3072), 0.5, np.float32))])      # pixels that are not integers
def test_a_cifar_batch_of_impossible_labels_or_pixels_is_refused_naming_it(cifar_batches, labels, data):
    with open(cifar_batches / "test_batch", "wb") as f:
        pickle.dump({b"labels": labels, b"data": data}, f, protocol=2)
    with pytest.raises(ValueError, match="test_batch is not a CIFAR python batch"):
        load_split(cifar_batches, "test", progress=False)


@pytest.mark.parametrize("name, keep, says", [("test_batch", 0, "is empty"), ("test_batch", 200, r"is cut short "
                                               r"\(200 bytes\)"), ("batches.meta", 30, r"is cut short \(30 bytes\)")])
def test_an_empty_or_cut_cifar_batch_file_is_named_as_such(cifar_batches, name, keep, says):
    (cifar_batches / name).write_bytes((cifar_batches / name).read_bytes()[:keep])
    with pytest.raises(ValueError, match=rf"cifar-10-batches-py/{name} {says}: download and unpack CIFAR-10's "
                                         rf"python batches again$"):
        load_split(cifar_batches, "test", progress=False)


def test_a_tree_whose_class_folders_are_links_is_decoded_again_when_their_images_change(tmp_path):
    real = write_tree(tmp_path / "real", splits=("test",))
    tree = tmp_path / "linked" / "test"
    tree.mkdir(parents=True)
    for c in TINY.classes:
        (tree / c).symlink_to(real / "test" / c, target_is_directory=True)
    (real / "test" / TINY.classes[1] / "loop").symlink_to(tmp_path / "linked", target_is_directory=True)  # a cycle
    before = load_split(tmp_path / "linked", "test", image_size=16, progress=False)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(real / "test" / TINY.classes[0] / "9999.png")
    after = load_split(tmp_path / "linked", "test", image_size=16, progress=False)
    assert len(after.labels) == len(before.labels) + 1


def test_a_class_folder_linked_to_another_class_is_decoded_again_when_the_link_is_repointed(image_tree):
    (image_tree / "test" / "lion").symlink_to("cat", target_is_directory=True)   # a class of the cat images
    before = load_split(image_tree, "test", image_size=16, progress=False)
    (image_tree / "test" / "lion").unlink()
    (image_tree / "test" / "lion").symlink_to("dog", target_is_directory=True)   # now of the dog images
    after = load_split(image_tree, "test", image_size=16, progress=False)
    lion, cat, dog = (after.classes.index(c) for c in ("lion", "cat", "dog"))
    assert np.array_equal(before.images[before.labels == lion], before.images[before.labels == cat])
    assert np.array_equal(after.images[after.labels == lion], after.images[after.labels == dog])


def test_a_cache_folder_that_cannot_be_written_warns_and_the_split_still_loads(image_tar, tmp_path, monkeypatch,
                                                                               capsys):
    blocked = tmp_path / "blocked"
    blocked.write_text("")                                    # a file where the cache's folders would go
    monkeypatch.setenv("BITVIT_CACHE", str(blocked / "cache"))
    data = load_split(image_tar, "test", image_size=16, progress=False)
    assert len(data.labels) == 18 and "cannot keep the decoded copy" in capsys.readouterr().err


def test_a_class_name_holding_a_line_separator_character_is_read_back_from_the_cache(tmp_path, capsys):
    tree = write_tree(tmp_path / "t", splits=("test",), classes=("cat\x1cdog", "frog"))
    first = load_split(tree, "test", image_size=16, progress=False)
    again = load_split(tree, "test", image_size=16, progress=False)
    assert again.classes == first.classes == ("cat\x1cdog", "frog") and "damaged" not in capsys.readouterr().err


def test_file_and_folder_names_that_are_not_utf_8_load_and_come_back_from_the_cache(tmp_path):
    tree = write_tree(tmp_path / "t", splits=("test",), classes=("caf\udce9", "frog"))   # b"caf\xe9": Latin-1
    archive = write_tar(tree, tmp_path / "caf\udce9.tar.gz", splits=("test",))
    for source in (tree, archive):
        for _ in range(2):   # decoded, then read from the cache
            assert load_split(source, "test", image_size=16, progress=False).classes == ("caf\udce9", "frog")


def test_a_class_name_holding_a_newline_is_read_back_from_the_cache_as_one_class(tmp_path, capsys):
    tree = write_tree(tmp_path / "t", splits=("test",), classes=("cat\ndog", "frog"))
    first = load_split(tree, "test", image_size=16, progress=False)
    again = load_split(tree, "test", image_size=16, progress=False)
    assert again.classes == first.classes == ("cat\ndog", "frog") and "damaged" not in capsys.readouterr().err


def test_cifar_batches_rewritten_are_decoded_again_not_read_from_the_cache(cifar_batches):
    before = load_split(cifar_batches, "test", progress=False)
    with open(cifar_batches / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0] * 4, b"data": np.full((4, 3072), 7, np.uint8)}, f, protocol=2)
    after = load_split(cifar_batches, "test", progress=False)
    assert len(before) == 20 and len(after) == 4 and (after.images == 7).all()


def test_a_rewritten_cifar_train_batch_is_decoded_again_not_read_from_the_cache(cifar_batches):
    before = load_split(cifar_batches, "trainval", progress=False)
    with open(cifar_batches / "data_batch_1", "wb") as f:
        pickle.dump({b"labels": [0] * 20, b"data": np.full((20, 3072), 7, np.uint8)}, f, protocol=2)
    after = load_split(cifar_batches, "trainval", progress=False)
    assert len(before) == len(after) == 100 and (after.images[:20] == 7).all()


def test_rewritten_cifar_class_names_are_read_again_not_from_the_cache(cifar_batches):
    load_split(cifar_batches, "test", progress=False)
    with open(cifar_batches / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    assert load_split(cifar_batches, "test", progress=False).classes == tuple(f"c{i}" for i in range(10))
