"""GET /v1/models/NAME/cells: the ranked units the web page colours a caption by, found beside the
checkpoint, in CAPTIONER_CELLS or shipped with the bundled model; a JSON 404 otherwise."""

from __future__ import annotations

import json
import shutil

import pytest

from service import create_app
from service.cells import BUNDLED, UnitsError, load_units, units_path
from tests.service.conftest import assert_problem


def units_file(path, indices=(0, 5, 31), kind="c") -> str:
    units = [{"name": f"unit {i} ({kind}): test {i}", "kind": kind, "index": i, "property": "position",
              "label": "position in caption", "score": 0.5 - i / 100} for i in indices]
    path.write_text(json.dumps({"alignment": "reading", "data": "test", "units": units}))
    return str(path)


def test_the_bundled_model_serves_its_shipped_units():
    app = create_app({"torch_threads": 1, "warmup": False, "precision": "fp32"})
    try:
        client = app.test_client()
        body = client.get("/v1/models/default/cells").get_json()
        shipped = json.loads(BUNDLED.read_text())
        assert body["model_name"] == "default"
        assert [u["name"] for u in body["units"]] == [u["name"] for u in shipped["units"]]
        assert body["units"][0] == shipped["units"][0]  # "unit 68 (c): subject already named", every field
        assert body["baseline"] == shipped["baseline"] and body["alignment"].startswith("reading")
        assert client.get("/v1/models").get_json()["models"][0]["cells"] is True
    finally:
        app.extensions["captioner"].close()


def test_a_checkpoint_without_units_is_a_json_404_and_listed_without(make_app):
    client = make_app(warmup=False).test_client()
    body = assert_problem(client.get("/v1/models/default/cells"), 404)
    assert "--units-file" in body["detail"]
    assert client.get("/v1/models").get_json()["models"][0]["cells"] is False
    assert client.get("/v1/model").get_json()["cells"] is False
    assert "unknown model" in assert_problem(client.get("/v1/models/nope/cells"), 404)["detail"]
    assert_problem(client.get("/v1/models/..%2Fdefault/cells"), 404)


def test_units_beside_the_checkpoint_are_found(make_app, tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint, checkpoint)
    units_file(tmp_path / "cells.json", indices=(3,))
    units_file(tmp_path / "best.cells.json", indices=(7, 2))  # the checkpoint's own file wins
    assert units_path(str(checkpoint)) == tmp_path / "best.cells.json"
    client = make_app(checkpoint=str(checkpoint), warmup=False).test_client()
    response = client.get("/v1/models/default/cells")
    assert response.status_code == 200 and response.headers["X-Captioner-Model"] == "default"
    assert [(u["kind"], u["index"]) for u in response.get_json()["units"]] == [("c", 7), ("c", 2)]


def test_the_cells_setting_names_the_default_models_file(make_app, tmp_path):
    path = units_file(tmp_path / "units.json", indices=(1, 4), kind="h")
    client = make_app(cells=path, warmup=False).test_client()
    units = client.get("/v1/models/default/cells").get_json()["units"]
    assert [u["name"] for u in units] == ["unit 1 (h): test 1", "unit 4 (h): test 4"]
    assert client.get("/v1/models").get_json()["models"][0]["cells"] is True


def test_units_of_another_model_are_refused_not_served(make_app):
    # The bundled model's units reach unit 372 of its 384-unit LSTM; the tiny model has 32 units.
    client = make_app(cells=str(BUNDLED), warmup=False).test_client()
    body = assert_problem(client.get("/v1/models/default/cells"), 404)
    assert "ranked on another model" in body["detail"]


def test_load_units_keeps_h_and_c_units_and_rejects_what_is_not_a_units_file(tmp_path):
    report = {"units": [{"kind": "i", "index": 3}, {"kind": "h", "index": 2, "score": 0.4, "extra": [1] * 9},
                        {"kind": "c", "index": 0}]}
    (tmp_path / "full.json").write_text(json.dumps(report))
    units = load_units(tmp_path / "full.json", hidden_dim=4)["units"]
    assert units == [{"name": "unit 2 (h)", "kind": "h", "index": 2, "score": 0.4},
                     {"name": "unit 0 (c)", "kind": "c", "index": 0}]
    for bad in ("not json", "[]", '{"units": []}', '{"units": [{"kind": "h", "index": true}]}'):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(UnitsError):
            load_units(tmp_path / "bad.json", hidden_dim=4)


def test_openapi_lists_the_cells_route(client):
    spec = client.get("/openapi.json").get_json()
    route = spec["paths"]["/v1/models/{name}/cells"]["get"]
    assert set(route["responses"]) >= {"200", "404"}
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Units"
    assert "Units" in spec["components"]["schemas"]
