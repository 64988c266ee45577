import pytest

from training.evaluate_paths import compare

IDS = ["a.jpg", "b.jpg", "c.jpg"]
REFERENCES = {"a.jpg": ["a dog runs on the grass", "a brown dog running"],
              "b.jpg": ["a man rides a bike", "a cyclist on a road"],
              "c.jpg": ["two children play in the water", "kids splashing in a pool"]}


def test_each_path_is_compared_with_fp32_and_with_its_earlier_captions():
    fp32 = ["a dog runs on the grass", "a man rides a bike", "two children play in the water"]
    worse = ["a dog runs on the grass", "a man is standing", "a cat sits"]
    report = compare(IDS, {"fp32": fp32, "int8": worse}, REFERENCES, resamples=200,
                     earlier={"fp32": dict(zip(IDS, fp32)), "int8": dict(zip(IDS, fp32))})
    assert report["fp32"]["delta_vs_earlier"] == 0 and report["fp32"]["identical_to_earlier"] == 1
    assert report["int8"]["delta_vs_earlier"] == pytest.approx(report["int8"]["delta_vs_fp32"])
    assert report["int8"]["delta_vs_earlier"] < 0 and report["int8"]["identical_to_earlier"] == pytest.approx(1 / 3)
    low, high = report["int8"]["delta_interval_vs_earlier"]
    assert low <= report["int8"]["delta_vs_earlier"] <= high
    assert "delta_vs_earlier" not in compare(IDS, {"fp32": fp32}, REFERENCES, resamples=10)["fp32"]
