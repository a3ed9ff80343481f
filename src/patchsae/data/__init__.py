"""Image sources and the activation store.

``patchsae.data.images`` reads images; ``patchsae.data.store`` holds their activations on disk;
``patchsae.data.loaders`` streams training batches out of a store, cut by the one re-batching
generator ``patchsae.data.rebatch``.
"""

from patchsae.data.images import (
    BadImage,
    BadRecord,
    DataConfig,
    DataError,
    ImageBatch,
    ImageSource,
    image_batches,
    load_rgb,
    open_images,
    shuffled_order,
    write_bad_report,
)
from patchsae.data.loaders import image_batches_from_store, token_batches
from patchsae.data.store import ActivationStore, StoreError

__all__ = [
    "ActivationStore",
    "BadImage",
    "BadRecord",
    "DataConfig",
    "DataError",
    "ImageBatch",
    "ImageSource",
    "StoreError",
    "image_batches",
    "image_batches_from_store",
    "load_rgb",
    "open_images",
    "shuffled_order",
    "token_batches",
    "write_bad_report",
]
