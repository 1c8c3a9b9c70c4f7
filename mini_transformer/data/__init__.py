"""The data pipeline: text -> token files (memmaps) + meta; the split; batch sampling.

For training::

    data = prepare_dataset(config.data)            # cached in data.cache_dir, reused while unchanged
    check_split_lengths(data, config.model.block_size)
    sampler = RandomBatchSampler(data.train, batch_size, block_size, seed=seed, rank=rank,
                                 world_size=world_size, device=device)
    x, y = sampler.next_batch()                    # (B, T) int64 each, y shifted by one
    for x, y in iter_sequential_batches(data.val, batch_size, block_size): ...  # exact val loss

Modules: :mod:`.sources` (inputs, named datasets, streaming), :mod:`.pipeline` (tokenizing into
files, the cache), :mod:`.batches` (samplers).
"""

from .batches import RandomBatchSampler, iter_sequential_batches
from .pipeline import (PreparedData, build_tokenizer, check_data_settings, check_split_lengths, is_prepared_dir,
                       load_prepared, prepare_dataset, prepare_inputs, split_sizes, token_dtype, write_prepared)
from .sources import DATASETS, SEPARATOR, Source, dataset_sources, expand_input, pystdlib_sources

__all__ = [
    "DATASETS", "PreparedData", "RandomBatchSampler", "SEPARATOR", "Source", "build_tokenizer",
    "check_data_settings", "check_split_lengths", "dataset_sources", "expand_input", "is_prepared_dir",
    "iter_sequential_batches",
    "load_prepared", "prepare_dataset", "prepare_inputs", "pystdlib_sources", "split_sizes", "token_dtype",
    "write_prepared",
]
