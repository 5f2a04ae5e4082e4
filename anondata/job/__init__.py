"""The dataset jobs, thin over the library: sources -> Ray Data actor pool -> shards, with a
resume journal; the restore job; the dataset card; publish's file set.

- `sources`: Parquet file/folder, image folder, save_to_disk, Hub id -> row ranges of splits
- `pipeline`: `run_anonymize(JobOptions)` (plan, Ray, commit, sign)
- `worker`: what runs on Ray workers (read tasks, `AnonymizerActor`)
- `shards`: shard names and the public table/Parquet writer
- `journal`: `DIR/.anondata-work/` (plan, commit markers, temp files)
- `card`: README.md with Hub YAML
- `restore`: `run_restore(...)`
- `publish`: the exact public file set and the one Hub upload call
"""
