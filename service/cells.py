"""The ranked units of a served model (what `captioner cells` found), for the web page's "under
the hood" view: where a checkpoint's units file is, and reading it.

    path = units_path(checkpoint, configured=settings.cells)   # Path or None
    units = load_units(path, hidden_dim=384)                    # raises UnitsError

Only these places are read, never a path a request names: the configured file (CAPTIONER_CELLS,
the default model's), `<checkpoint stem>.cells.json` or `cells.json` beside the checkpoint, and for
the bundled model `captioner/weights/default_cells.json`. Both the small file `captioner cells
--units-file` writes and the full `cells.json` report are accepted (the latter's gate units and
its tail are dropped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captioner.api import DEFAULT_CHECKPOINT

BUNDLED = DEFAULT_CHECKPOINT.parent / "default_cells.json"
MAX_UNITS = 100  # a full report ranks every unit; the page offers the best
KEYS = ("property", "label", "group", "direction", "score", "over_shuffled_max")


class UnitsError(ValueError):
    """The units file is unreadable or does not fit the model."""


def units_path(checkpoint: str | None, configured: str | None = None) -> Path | None:
    """The units file of the model at `checkpoint` (None: the bundled model), or None."""
    if configured:
        return Path(configured)
    if checkpoint is None:
        return BUNDLED if BUNDLED.is_file() else None
    where = Path(checkpoint)
    for candidate in (where.with_name(where.stem + ".cells.json"), where.with_name("cells.json")):
        if candidate.is_file():
            return candidate
    return None


def load_units(path: Path, *, hidden_dim: int) -> dict[str, Any]:
    """-> {"alignment", "data", "split", "baseline", "units": [{"name", "kind", "index", ...}]},
    h and c units only, best first. Raises `UnitsError` for a file that is not a units file or
    names a unit the model does not have (it was ranked on another model)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnitsError(f"cannot read the units file {path}: {error}") from None
    listed = report.get("units") if isinstance(report, dict) else None
    if not isinstance(listed, list):
        raise UnitsError(f"{path} has no 'units' list: write it with captioner cells --units-file")
    units = []
    for unit in listed:
        if not isinstance(unit, dict) or unit.get("kind") not in ("h", "c"):
            continue  # gate units of a full report
        index = unit.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < hidden_dim:
            raise UnitsError(f"{path} names unit {index!r} ({unit.get('kind')}) but this model has "
                             f"{hidden_dim} units: it was ranked on another model")
        name = unit.get("name") if isinstance(unit.get("name"), str) else f"unit {index} ({unit['kind']})"
        units.append({"name": name, "kind": unit["kind"], "index": index,
                      **{key: unit[key] for key in KEYS if key in unit}})
        if len(units) == MAX_UNITS:
            break
    if not units:
        raise UnitsError(f"{path} lists no h or c unit")
    return {"alignment": report.get("alignment"), "data": report.get("data"), "split": report.get("split"),
            "baseline": report.get("baseline"), "units": units}


def model_units(checkpoint: str | None, configured: str | None, *, hidden_dim: int) -> tuple[dict | None, str]:
    """(units, "") or (None, why there are none): the service says why in its 404."""
    path = units_path(checkpoint, configured)
    if path is None:
        return None, ("no units file beside the checkpoint: run captioner cells CHECKPOINT --units-file "
                      "<checkpoint stem>.cells.json, or set CAPTIONER_CELLS")
    try:
        return load_units(path, hidden_dim=hidden_dim), ""
    except UnitsError as error:
        return None, str(error)
