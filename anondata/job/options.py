"""What a job is asked to do (JobOptions) and what it did (JobResult)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_SHARD_SIZE = 1000


@dataclass
class JobOptions:
    source: str
    out: str
    recipients: list[str]  # paths of NAME.pub files
    signing_key: str  # path of the runner's NAME.key (signs the manifest)
    image_column: str = "image"
    id_column: str | None = None
    splits: list[str] | None = None
    limit: int | None = None
    # Other columns that can hold pictures: left out of the release, or published unchanged on the
    # runner's word that they hold no faces (columns.choose_columns refuses any not named here)
    drop_columns: list[str] = field(default_factory=list)
    keep_columns: list[str] = field(default_factory=list)
    model: str = "embedded"
    steps: int | None = None
    inversion_iters: int | None = None
    sign_cell: int = 0  # 0: a sign per value (the default); N >= 1: cells of N (docs/SCHEME.md)
    background: str = "noised"  # scheme v3 (the default); "inverted": v1 / v2, to reproduce older releases
    flip_centre: str = "mean-face"  # v3: what the flip reflects around (anonymizer.FLIP_CENTRES)
    faces: str = "aligned"  # aligned | detect
    face_box: tuple[int, int, int, int] | None = None
    detector: str = "hog"
    on_no_face: str = "quarantine"
    # detect: a second detector whose extra faces quarantine the photo. "auto": the other of hog /
    # haar (fail closed by default: a face the first one misses would be published), None: off
    cross_check: str | None = "auto"
    lossless: bool = True
    gpus: int | None = None  # None: every GPU the cluster has
    workers: int | None = None  # CPU actors when there are no GPUs; None: CPUs - 1
    batch_size: int = 8  # records per actor call
    # Stop the job when the model step fails on this many records in a row (0: never; _Breaker)
    max_failures_in_a_row: int = 10
    # Crops per model call (the core pads every call to this shape and records it, so restore
    # recomputes each crop exactly as it was made). None: 1 on CPU actors, batch_size on GPUs.
    model_batch: int | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    resume: bool = False
    license: str = "other"
    progress: bool = True
    num_cpus: int | None = None  # for a local Ray instance started here
    # the fields set on the command line: --resume refuses those that differ from the plan
    given: frozenset = frozenset()


@dataclass
class JobResult:
    out: str
    dataset_id: str
    anonymized: int
    quarantined: int
    shards: int
    resumed_shards: int
    skipped: int = 0  # past --limit: listed in the manifest, not processed
    # (record id, reason, where) of each quarantined record, for the runner's terminal; `where`:
    # Source.where (an image folder's file), or None
    quarantine: list[tuple[str, str, str | None]] = field(default_factory=list)


# JobOptions fields whose command-line flag is not --FIELD-NAME: the CLI maps what was typed to
# fields, and --resume's refusal names fields by their flags
IRREGULAR_FLAGS = {"splits": "--split", "drop_columns": "--drop-column", "keep_columns": "--keep-column",
                   "lossless": "--lossy-restore"}


def flag_of(field_name: str) -> str:
    return IRREGULAR_FLAGS.get(field_name, "--" + field_name.replace("_", "-"))
