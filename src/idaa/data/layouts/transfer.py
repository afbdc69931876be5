"""Readers of the transfer sets of Tables 4 and 9 in the layouts their official archives unpack to.

Each reader takes the dataset folder (the unpacked archive's top folder or the folder above it) and a split,
"train" (the official train or trainval list) or "test", and returns a Listing. CIFAR-10/100 are read by
`idaa.data.memory` instead (python pickles, decoded in memory).
"""

from __future__ import annotations

from pathlib import Path

from idaa.data.listing import Listing, list_images, subfolders
from idaa.errors import DataError

__all__ = ["read_aircraft", "read_birdsnap", "read_cub200", "read_dtd", "read_flowers102", "read_pets"]


def read_aircraft(root: Path, split: str) -> Listing:
    """FGVC-Aircraft 2013b, 100 variants: data/images/<id>.jpg and data/images_variant_{trainval,test}.txt."""
    base = _base(root, "FGVC-Aircraft", ("images_variant_test.txt", "images"),
                 ("data", "fgvc-aircraft-2013b/data"))
    listed = {s: _fields(base / f"images_variant_{s}.txt", 2, maxsplit=1) for s in ("trainval", "test")}
    if (base / "variants.txt").is_file():
        classes = [line.strip() for line in _lines(base / "variants.txt")]
    else:
        classes = sorted({v for rows in listed.values() for _, v in rows})
    part = "trainval" if split == "train" else "test"
    return _labelled(base / f"images_variant_{part}.txt",
                     [(base / "images" / f"{image}.jpg", variant) for image, variant in listed[part]], classes)


def read_dtd(root: Path, split: str) -> Listing:
    """DTD, 47 textures, fold 1: images/<class>/*.jpg with labels/train1.txt + val1.txt (train), test1.txt."""
    base = _base(root, "DTD", ("labels/test1.txt", "images"), ("dtd",))
    classes = [p.name for p in subfolders(base / "images")]
    names = ("train1.txt", "val1.txt") if split == "train" else ("test1.txt",)
    pairs = [(base / "images" / rel, rel.split("/")[0]) for name in names
             for rel in _lines(base / "labels" / name)]
    return _labelled(base / "labels" / names[0], pairs, classes)


def read_pets(root: Path, split: str) -> Listing:
    """Oxford-IIIT Pets, 37 breeds: images/<Breed>_<n>.jpg with annotations/trainval.txt (train) and test.txt."""
    base = _base(root, "Oxford-IIIT Pets", ("annotations/test.txt", "images"), ("oxford-iiit-pet",))
    names: dict[int, str] = {}
    listed = {}
    for part in ("trainval", "test"):
        rows = _fields(base / "annotations" / f"{part}.txt", 2)
        try:
            listed[part] = [(image, int(class_id)) for image, class_id, *_ in rows]
        except ValueError:
            raise DataError(f"file '{base / 'annotations' / part}.txt' has a class id that is not a number") from None
        for image, class_id in listed[part]:
            names.setdefault(class_id, image.rsplit("_", 1)[0])
    if sorted(names) != list(range(1, len(names) + 1)):
        raise DataError(f"the class ids in '{base / 'annotations'}' are not 1..{len(names)}")
    classes = [names[i] for i in sorted(names)]
    part = "trainval" if split == "train" else "test"
    pairs = [(base / "images" / f"{image}.jpg", classes[class_id - 1]) for image, class_id in listed[part]]
    return _labelled(base / "annotations" / f"{part}.txt", pairs, classes)


def read_flowers102(root: Path, split: str) -> Listing:
    """Oxford Flowers-102: jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat (trnid + valid = train, tstid = test)."""
    base = _base(root, "Flowers-102", ("imagelabels.mat", "setid.mat", "jpg"), ("flowers-102", "flowers102"))
    from scipy.io import loadmat

    try:
        labels = [int(v) for v in loadmat(str(base / "imagelabels.mat"))["labels"].ravel()]
        sets = loadmat(str(base / "setid.mat"))
        ids = sorted(int(i) for key in (("trnid", "valid") if split == "train" else ("tstid",))
                     for i in sets[key].ravel())
    except Exception as exc:  # scipy raises many types for a foreign or truncated .mat file
        raise DataError(f"cannot read the Flowers-102 .mat files in '{base}': {exc}") from None
    if not labels or min(labels) < 1 or any(not 1 <= i <= len(labels) for i in ids):
        raise DataError(f"'{base / 'setid.mat'}' and '{base / 'imagelabels.mat'}' do not match (ids, labels 1..)")
    classes = [str(c) for c in range(1, max(labels) + 1)]  # the release names the classes by number only
    pairs = [(base / "jpg" / f"image_{i:05d}.jpg", str(labels[i - 1])) for i in ids]
    return _labelled(base / "setid.mat", pairs, classes)


def read_cub200(root: Path, split: str) -> Listing:
    """CUB-200-2011: images/<NNN.Name>/*.jpg with images.txt, image_class_labels.txt, train_test_split.txt,
    classes.txt."""
    base = _base(root, "CUB-200-2011", ("images.txt", "image_class_labels.txt", "train_test_split.txt",
                                         "classes.txt", "images"), ("CUB_200_2011",))
    classes_by_id = dict(_fields(base / "classes.txt", 2))
    paths = dict(_fields(base / "images.txt", 2))
    label_of = dict(_fields(base / "image_class_labels.txt", 2))
    wanted = "1" if split == "train" else "0"
    pairs = []
    for image_id, is_train in _fields(base / "train_test_split.txt", 2):
        if is_train != wanted:
            continue
        if image_id not in paths or label_of.get(image_id) not in classes_by_id:
            raise DataError(f"image id {image_id} of '{base / 'train_test_split.txt'}' is missing from images.txt, "
                            "image_class_labels.txt or classes.txt")
        pairs.append((base / "images" / paths[image_id], classes_by_id[label_of[image_id]]))
    ordered = [classes_by_id[k] for k in sorted(classes_by_id, key=int)]
    return _labelled(base / "train_test_split.txt", pairs, ordered)


def read_birdsnap(root: Path, split: str) -> Listing:
    """Birdsnap, 500 species, as get_birdsnap.py leaves it: images/<species>/*.jpg (or download/images/) and the
    release's test_images.txt (header line, then '<species>/<file>.jpg'); every other downloaded image trains.

    Flickr has lost part of the images, so a test image that was never downloaded is skipped, not an error.
    """
    images = next((d for d in (root / "images", root / "download" / "images") if d.is_dir()), None)
    listing = next((f for f in (root / "test_images.txt", root / "download" / "test_images.txt") if f.is_file()),
                   None)
    if images is None or listing is None:
        raise DataError(f"no Birdsnap data in '{root}': expected images/<species>/*.jpg and test_images.txt "
                        "(what get_birdsnap.py writes)")
    classes = [p.name for p in subfolders(images)]
    test = {rel.strip() for rel in _lines(listing)[1:]}  # the first line is the header "path"
    pairs = []
    for name in classes:
        for path in list_images(images / name):
            rel = path.relative_to(images).as_posix()
            if (rel in test) == (split == "test"):
                pairs.append((path, name))
    return _labelled(listing, pairs, classes, check_files=False)


def _base(root: Path, title: str, markers: tuple[str, ...], below: tuple[str, ...]) -> Path:
    """The folder holding every marker: root itself or one of the sub-folders the archive unpacks to."""
    for base in (root, *(root / b for b in below)):
        if all((base / m).exists() for m in markers):
            return base
    raise DataError(f"no {title} data in '{root}': expected {', '.join(markers)} there or in "
                    f"{' or '.join(b + '/' for b in below)}")


def _lines(path: Path) -> list[str]:
    """Non-empty lines of a text file; a missing file is a one-line DataError."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise DataError(f"missing file '{path}'") from None
    except OSError as exc:
        raise DataError(f"cannot read '{path}': {exc.strerror}") from None
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _fields(path: Path, columns: int, maxsplit: int = -1) -> list[list[str]]:
    """Whitespace-separated rows with at least `columns` fields (an aircraft variant may hold spaces)."""
    rows = [line.strip().split(maxsplit=maxsplit) for line in _lines(path)]
    for lineno, row in enumerate(rows, 1):
        if len(row) < columns:
            raise DataError(f"bad line {lineno} in '{path}': expected {columns} fields")
    return rows


def _labelled(list_file: Path, pairs: list[tuple[Path, str]], classes: list[str], check_files: bool = True) -> Listing:
    """Listing of (file, class name) pairs; unknown classes, listed files that are missing and empty splits fail."""
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for path, name in pairs:
        if name not in index:
            raise DataError(f"'{list_file}' names class '{name}' for '{path.name}', which is not one of the "
                            f"{len(classes)} classes")
        if check_files and not path.is_file():
            raise DataError(f"missing image '{path}' listed in '{list_file}'")
        files.append(path)
        labels.append(index[name])
    if not files:
        raise DataError(f"'{list_file}' lists no images")
    return Listing(files, labels, classes)
