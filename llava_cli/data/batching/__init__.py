"""From samples to the batches a training step takes: padding or packing (`collator`), the
order of samples (`sampler`) and cross-sample packing to a token budget (`packing`)."""
