"""`captioner caption-folder`: caption every image of a folder, batched and resumable.

    command.py     the command: its arguments, and which engine runs it
    job.py         the one command skeleton, `run(args, engine)`: checks, resume, summary, exit status
    local.py       the local engine: this machine, DataLoader workers, a local OUT
    ray_engine.py  the Ray engine (`--engine ray`): a Ray cluster, local paths or URIs, sharded OUT
    listing.py     which files of a folder are images
    records.py     one record per image, its formats (jsonl, csv, coco) and encodings
    storage.py     OUT appended to batch by batch and resumed; atomic whole-file writes
    imageset.py    image files decoded in DataLoader workers (also training's feature caches)
    gallery.py     the static HTML gallery (`--html`)

The engines import these modules and never each other; nothing imports `captioner.cli`. Nothing is
imported here: Ray loads only when `--engine ray` runs.
"""
