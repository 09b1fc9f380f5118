"""The streaming loader: shards -> per-rank, per-worker sample streams -> task batches, resumable.
``loader`` builds the plan and the DataLoader; ``shard_order`` decides which stream reads what;
``shard_reader`` reads one shard robustly; ``batches`` decodes samples into a task's tensors."""
