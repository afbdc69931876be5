"""Images for self-supervised training, in one-way layers (each imports only from those above it in this list):

- `decode`: image files to upright RGB pixels (JPEG via libjpeg-turbo, EXIF orientation, PNG, ...); `pickles`;
- `crops`: seeded random-resized and centre crops made in DataLoader workers; `unreadable`: bad images;
- `listing`: file listings, the listing cache and the one normalisation statistic of a set of image files;
- `layouts`: dataset folders in their published layouts (a registry of readers); `folder_cache`;
- `options` and `protocol`: how images are read (`StreamOptions`, its flags) and the `Source` protocol;
- sources: `memory` (decoded into a tensor), `streamed` (decoded from files as used), `shards` (WebDataset),
  opened by name and folder with `sources.open_dataset`;
- `views`: batched random views on the training device;
- `feeds`: what the training loops iterate, one feed per kind of source;
- `cli_args`: `idaa data pack|list|check`.
"""

from idaa.data.feeds import ShardFeed, StreamFeed, TensorFeed, ViewBatch, make_feed, stopped_by_bad_image
from idaa.data.memory import DATASETS, STATS, ImageDataset, balanced_indices, load_dataset
from idaa.data.options import (
    BAD_IMAGES,
    StreamOptions,
    add_stream_arguments,
    checkpoint_options,
    default_workers,
    options_from,
)
from idaa.data.protocol import Source, rank_share
from idaa.data.shards import ShardSource, is_shard_folder, pack_shards
from idaa.data.sources import open_dataset
from idaa.data.streamed import StreamedImages, StreamingDataset
from idaa.data.unreadable import readable
from idaa.data.views import POLICIES, ViewPolicy, build_view_policy, crop_scale
from idaa.errors import DataError

__all__ = ["BAD_IMAGES", "DATASETS", "POLICIES", "STATS", "DataError", "ImageDataset", "ShardFeed", "ShardSource",
           "Source", "StreamFeed", "StreamOptions", "StreamedImages", "StreamingDataset", "TensorFeed", "ViewBatch",
           "ViewPolicy", "add_stream_arguments", "balanced_indices", "build_view_policy", "checkpoint_options",
           "crop_scale", "default_workers", "is_shard_folder", "load_dataset", "make_feed", "open_dataset",
           "options_from", "pack_shards", "rank_share", "readable", "stopped_by_bad_image"]
