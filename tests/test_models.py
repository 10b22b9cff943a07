"""Models: heads and poolings against hand computations on the backbone's feature map; weight loading."""
import huggingface_hub.constants
import pytest
import timm
import torch

from utils.config import ConfigError
from utils.models import HEADS, POOLINGS, PretrainedWeightsUnavailable, build_model

SMALL_INPUT = 64  # resnet18 -> 2x2 feature maps


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SMALL_INPUT, SMALL_INPUT, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("head", HEADS)
def test_head_outputs_match_hand_computation(head, images):
    torch.manual_seed(0)
    model = build_model("resnet18", head=head).eval()
    assert (model.head_type, model.pooling_type, model.arch) == (head, "avg", "resnet18")
    with torch.no_grad():
        out = model(images)
        features = model.backbone(images).mean(dim=(2, 3))  # global average pooling by hand
    assert out["reg"].shape == (2,) and out["reg"].dtype == torch.float32
    torch.testing.assert_close(out["features"], features, rtol=1e-4, atol=1e-5)  # the pooled features, for RankSim
    if head == "reg":
        assert set(out) == {"reg", "features"}
        want = features @ model.head_reg.weight[0] + model.head_reg.bias[0]
        torch.testing.assert_close(out["reg"], want, rtol=1e-4, atol=1e-5)
        return
    assert set(out) == {"reg", "expectation", "logits", "features"}
    assert out["logits"].shape == (2, 101) and out["expectation"].shape == (2,)
    with torch.no_grad():
        logits = features @ model.head_logits.weight.T + model.head_logits.bias
    torch.testing.assert_close(out["logits"], logits, rtol=1e-4, atol=1e-5)
    for row in range(2):
        exp = [float(v) for v in logits[row].double().exp()]
        probs = [v / sum(exp) for v in exp]
        expectation = sum(i * p for i, p in enumerate(probs))
        f2 = sum(w * p for w, p in zip(model.head_reg.weight[0].tolist(), probs)) + model.head_reg.bias.item()
        assert out["expectation"][row].item() == pytest.approx(expectation, rel=1e-4)
        assert out["reg"][row].item() == pytest.approx(f2, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_poolings_match_hand_computation(pooling, images):
    torch.manual_seed(0)
    model = build_model("resnet18", head="reg", pooling=pooling).eval()
    with torch.no_grad():
        fmap = model.backbone(images)  # (2, 512, 2, 2)
        got = model.features(images)
    avg, mx = fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))
    want = {"avg": avg, "hybrid": mx,  # 2x2 map: the 2x2 max-pool leaves one cell
            "avgmax": 0.5 * (avg + mx), "catavgmax": torch.cat([avg, mx], dim=1)}[pooling]
    torch.testing.assert_close(got, want)
    assert model.head_reg.in_features == 512 * (2 if pooling == "catavgmax" else 1)


def test_hybrid_pooling_odd_and_tiny_maps():
    torch.manual_seed(0)
    model = build_model("resnet18", head="exp", pooling="hybrid").eval()
    fmap = torch.arange(9.0).reshape(1, 1, 3, 3)
    # ceil mode: windows {0,1,3,4}, {2,5}, {6,7}, {8} -> maxima 4, 5, 7, 8 -> mean 6
    assert model.pool(fmap).item() == pytest.approx(6.0)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))  # 1x1 feature map
    assert out["reg"].shape == (2,) and torch.isfinite(out["reg"]).all()


@pytest.mark.parametrize("arch", ["resnest14d", "resnest26d"])
def test_small_resnests_build_and_run(arch):
    model = build_model(arch, head="ldl", pooling="hybrid", in_chans=1, drop_rate=0.2).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, SMALL_INPUT, SMALL_INPUT))
    assert out["logits"].shape == (2, 101)
    assert model.head_logits.in_features == model.backbone.num_features == 2048


@pytest.mark.parametrize("arch, channels", [("mobilenetv3_large_100", 1280), ("ghostnet_100", 1280),
                                            ("lcnet_100", 1280), ("efficientnet_lite0", 1280), ("resnet10t", 512)])
def test_heads_fit_the_map_of_backbones_that_convolve_after_pooling(arch, channels):
    # MobileNetV3, GhostNet and LCNet apply a 1x1 conv after timm's pooling: without it (global_pool="") the map
    # has head_hidden_size channels, not num_features (960 / 512)
    model = build_model(arch, head="exp", pooling="hybrid").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert model.head_logits.in_features == channels and out["reg"].shape == (2,)


def test_large_paper_backbones_are_timm_names():
    for name in ["resnest50d", "resnest101e", "resnest200e", "resnext50_32x4d", "skresnext50_32x4d",
                 "seresnet50", "efficientnet_b4", "resnest14d", "resnest26d", "resnet18"]:
        assert timm.is_model(name), name


def test_dropout_and_gradients(images):
    model = build_model("resnet18", head="exp", drop_rate=0.5)
    assert model.dropout.p == 0.5
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images)["reg"], model(images)["reg"])
    model.train()
    out = model(images)
    (out["reg"].sum() + out["expectation"].sum()).backward()
    assert model.backbone.conv1.weight.grad is not None and model.backbone.conv1.weight.grad.abs().sum() > 0


def test_head_is_float32_under_bf16_autocast(images):
    model = build_model("resnet18", head="ldl").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert all(v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(out["logits"].softmax(1).sum(1), torch.ones(2))


def test_bad_names_raise_with_choices():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet181")
    with pytest.raises(ValueError, match="avg.*hybrid.*avgmax.*catavgmax"):
        build_model("resnet18", pooling="gem")
    with pytest.raises(ValueError, match="reg.*exp.*ldl"):
        build_model("resnet18", head="softmax")


def test_offline_pretrained_raises_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub reads these at import time: patch its constants too (empty cache, no network).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        build_model("resnet18", pretrained=True)
    message = str(info.value)
    assert "network" in message and "HF_HOME" in message and "pretrained_file" in message
    assert "-p pretrained false" in message and "HF_HUB_OFFLINE is set" in message and "\n" not in message
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ConfigError)  # one line in every CLI


def test_pretrained_file_loads_local_weights(tmp_path):
    torch.manual_seed(123)
    source = timm.create_model("resnet18")  # default 1000-class head: dropped on load
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", head="reg", pretrained_file=path)
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_missing_pretrained_file_names_it(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_model("resnet18", pretrained_file=missing)
