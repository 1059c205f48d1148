"""DeepSpeed checkpoints that a crash can never leave looking complete, that say when they are
damaged, and that resume on another number of ranks.

Layout under RUN/checkpoints/:
    step_00000120/              DeepSpeed's files (model, optimizer shards per rank)
    step_00000120/rank_00001.pt this rank's client state: data position, RNG states
    step_00000120/MANIFEST.json size and sha256 of every file above, world size (rank 0 writes
                                it after every rank's files are on disk)
    step_00000120/COMPLETE      written by rank 0 after the manifest
    latest                      the newest complete tag, replaced atomically (temp + rename)

`resume=auto` takes the newest tag that has COMPLETE, whatever `latest` says: a kill during a
write leaves a tag without the marker, which is ignored (and removed by the next cleanup).
A write that fails (disk full) removes its tag dir; weights that are not finite are never saved.
Every file of the checkpoint is checked against MANIFEST.json before it is resumed from; a
damaged one is named and skipped for the next intact one (`choose_resume`). Checkpoints from
before manifests (no MANIFEST.json) are taken with a warning.

One decision for all ranks: rank 0 lists the checkpoints and broadcasts the list; the ranks hash
their share of the files and gather the verdicts, so every rank resumes the same tag. That needs
RUN/ on storage every rank sees, which `check_shared_run_dir` proves before step 1.

Resume follows this run's config, not the checkpoint's, for everything that is a setting: the LR
schedule (lr, warmup, total steps, floor), AdamW's betas, eps and weight decay, and gradient
clipping; the
checkpoint supplies the state (weights, moments, step count, data position, RNG).

Elastic resume (docs/elastic_resume.md): a checkpoint written on N ranks resumes on M != N at
ZeRO-1/2/3. DeepSpeed's own load_checkpoint refuses that, so `load_elastic` reads every
parameter's fp32 master weights and Adam moments from the N-rank files (`ZeroCheckpoint`) and
writes them into the fresh M-rank engine through DeepSpeed's tensor-fragment API.

Trust boundary: our client state is read with `torch.load(weights_only=True)` (tensors and
plain containers only) before DeepSpeed's `load_checkpoint`, which unpickles its own files in
full: resume only from checkpoints your runs wrote. The elastic path reads DeepSpeed's files
with weights_only=True too, allowing only four DeepSpeed classes (deepspeed_safe_globals).

One module per concern: layout.py (names, tags, collectives), integrity.py (shared RUN/,
manifests, verification, the choice of tag), state.py (save, client state), settings.py (the
resumed run's settings), load.py (resume), elastic.py (N ranks -> M ranks).
"""

from trainer.checkpoint.elastic import (  # noqa: F401
    OPTIM_RE,
    STATE_KEYS,
    ZeroCheckpoint,
    _ensure_optimizer_state,
    _Flat,
    _flat_partitions,
    _optim_files,
    _zero3_piece,
    deepspeed_safe_globals,
    load_deepspeed_file,
    load_elastic,
)
from trainer.checkpoint.integrity import (  # noqa: F401
    Verdict,
    _check_file,
    _checkpoint_files,
    _read_manifest,
    _share,
    check_shared_run_dir,
    choose_resume,
    damaged_note,
    sha256_file,
    unverified_note,
    verify,
    write_manifest,
)
from trainer.checkpoint.layout import (  # noqa: F401
    CLIENT_RE,
    COMPLETE,
    HASH_CHUNK,
    LATEST,
    MANIFEST,
    MANIFEST_VERSION,
    PROBE_PREFIX,
    TAG_RE,
    CheckpointConfig,
    CheckpointError,
    StorageError,
    _all_gather,
    _atomic_write_text,
    _broadcast,
    _distributed,
    _rank,
    _world,
    complete_tags,
    find_resume_dir,
    tag_for,
)
from trainer.checkpoint.load import (  # noqa: F401
    Resumed,
    load,
)
from trainer.checkpoint.settings import (  # noqa: F401
    HYPERPARAMS,
    _fmt,
    _schedule_keys,
    advance_schedule,
    restore_run_settings,
    run_settings,
)
from trainer.checkpoint.state import (  # noqa: F401
    _cleanup,
    _rng_state,
    _set_rng_state,
    load_client_state,
    load_data_states,
    save,
    saved_world_size,
    weights_finite,
)
