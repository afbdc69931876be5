"""How images are read (`StreamOptions`): the --stream/--image-size/--workers/--bad-images/--test-fraction
settings, their flags, and how evaluation reads a checkpoint's data again."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from idaa.errors import DataError

__all__ = ["BAD_IMAGES", "StreamOptions", "add_stream_arguments", "checkpoint_options", "default_workers",
           "options_from"]

BAD_IMAGES = ("error", "skip")


def default_workers() -> int:
    """Decoding processes when --workers is not given: the cores this process may use, less one for training."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


@dataclass
class StreamOptions:
    """How images are read: --stream, --image-size, --workers, --bad-images (None = automatic/default)."""

    stream: bool | None = None
    image_size: int | None = None
    workers: int | None = None
    bad_images: str | None = None  # None: "error", or on a checkpoint's own data the run's own choice
    seed: int = 0
    test_fraction: float | None = None  # a single labelled folder: hold out this seeded share of each class

    def validate(self) -> StreamOptions:
        """One-line errors for impossible values before anything is read."""
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise DataError(f"--workers must be an integer >= 0, got {self.workers!r}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            raise DataError(f"--image-size must be an integer >= 8, got {self.image_size!r}")
        if self.test_fraction is not None and not (isinstance(self.test_fraction, int | float)
                                                   and 0 < self.test_fraction < 1):
            raise DataError(f"--test-fraction must be a number in (0, 1), got {self.test_fraction!r}")
        if self.bad_images is not None and self.bad_images not in BAD_IMAGES:
            raise DataError(f"--bad-images must be one of {', '.join(BAD_IMAGES)}, got {self.bad_images!r}")
        return self

    @property
    def num_workers(self) -> int:
        """Decoding processes: --workers, or a default from the cores."""
        return default_workers() if self.workers is None else self.workers


def add_stream_arguments(parser: Any, image_size: bool = True) -> None:
    """The --stream/--image-size/--workers/--bad-images flags of every command that reads images."""
    parser.add_argument("--stream", action="store_true", default=None,
                        help="decode images from their files in worker processes (automatic for mixed or large)")
    if image_size:
        parser.add_argument("--image-size", type=int, default=None,
                            help="crop size of streamed images (default: their size if uniform, else 224)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes decoding streamed images (default: the cores less one)")
    parser.add_argument("--bad-images", default=None, choices=BAD_IMAGES,
                        help="error (stop, naming the file) or skip unreadable images (default: error, or on a "
                             "checkpoint's own data the run's own choice)")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help="a single labelled folder: hold out this seeded share of every class as the test split")


def options_from(args: Any, seed: int = 0) -> StreamOptions:
    """StreamOptions from parsed --stream/--image-size/--workers/--bad-images flags."""
    return StreamOptions(args.stream, getattr(args, "image_size", None), args.workers, args.bad_images, seed,
                         getattr(args, "test_fraction", None)).validate()


def checkpoint_options(cfg: dict[str, Any], same_data: bool, given: StreamOptions | None = None) -> StreamOptions:
    """How evaluation reads data again: on the run's own data, its streaming choice and crop size by default."""
    given = given or StreamOptions()
    if not same_data:
        return given.validate()
    stream = given.stream if given.stream is not None else cfg.get("stream")
    test_fraction = given.test_fraction if given.test_fraction is not None else cfg.get("test_fraction")
    bad_images = given.bad_images or cfg.get("bad_images")  # a run trained with skip is evaluated with skip
    return replace(given, stream=stream, image_size=given.image_size or cfg.get("image_size"),
                   seed=cfg.get("seed", 0), test_fraction=test_fraction, bad_images=bad_images).validate()
