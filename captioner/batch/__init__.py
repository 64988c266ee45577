"""`captioner caption-folder`: caption every image of a folder, batched and resumable.

    local.py       the command and its local engine: listing, records, stores and writers
    ray_engine.py  the same command on a Ray cluster (`--engine ray`)
    imageset.py    image files decoded in DataLoader workers (also training's feature caches)
    gallery.py     the static HTML gallery (`--html`)

Nothing is imported here: Ray loads only when `--engine ray` runs.
"""
