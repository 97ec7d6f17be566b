"""Offline-first weights: files the tests create themselves, caches that are empty or filled by the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from transferlab.backbones.weights import (
    WeightsError,
    cached_pretrained_file,
    pretrained_file,
    read_state_dict,
)
from transferlab.engine.assembly import build_backbone, build_model, build_task
from transferlab.engine.checkpoint import save_checkpoint
from transferlab.tasks.base import TargetSpec

TARGET = TargetSpec(kind="label", num_classes=3, in_channels=3, image_size=(32, 32))
CONVNET = {"widths": [4, 8, 8]}


def convnet(seed: int, **options):
    torch.manual_seed(seed)
    return build_backbone("convnet", {**CONVNET, **options}, TARGET)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weights_from_a_safetensors_file(tmp_path: Path) -> None:
    source = convnet(1)
    path = tmp_path / "convnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = convnet(2, weights=str(path))
    assert same(loaded, source) and not same(convnet(2), source)


def test_weights_from_a_weights_only_torch_file_and_from_a_transferlab_checkpoint(tmp_path: Path) -> None:
    source = convnet(1)
    pt = tmp_path / "convnet.pt"
    torch.save({"state_dict": source.state_dict()}, pt)
    assert same(convnet(2, weights=str(pt)), source)
    task = build_task("digits", {"image_size": 16, "channels": 3}, classes=[0, 1, 2])
    model = build_model(("convnet", CONVNET), ("classify", {}), task)
    ckpt = save_checkpoint(model, tmp_path / "model.safetensors")
    assert same(convnet(3, weights=str(ckpt)), model.backbone)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "weights file not found"),
        (b"", "cannot read weights file"),
        (b"not a checkpoint", "cannot read weights file"),
    ],
)
def test_bad_weights_files_name_the_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "weights.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=message) as info:
        convnet(1, weights=str(path))
    assert str(path) in str(info.value)


def test_weights_of_another_backbone_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in convnet(1, widths=[6, 8, 8]).state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="other shapes"):
        convnet(2, weights=str(path))
    save_file({"unrelated": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="lacks .* of the backbone's"):
        convnet(2, weights=str(path))


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the Hugging Face and torch hub caches at empty folders of this test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch"))
    yield tmp_path
    torch.hub.set_dir(previous)


def test_pretrained_without_a_cache_says_where_it_looked(empty_caches: Path) -> None:
    with pytest.raises(WeightsError) as info:
        pretrained_file("resnet18", None, pretrained=True)
    message = str(info.value)
    assert "never downloads" in message and "weights: /path/to/file.safetensors" in message
    assert str(empty_caches / "hf") in message and str(empty_caches / "torch") in message
    assert pretrained_file("resnet18", None, pretrained=False) is None


def test_pretrained_found_in_the_torch_hub_cache(empty_caches: Path) -> None:
    from timm.models import get_pretrained_cfg

    url = get_pretrained_cfg("resnet18").url
    cached = empty_caches / "torch" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save({"fc.bias": torch.zeros(1000)}, cached)
    assert cached_pretrained_file("resnet18")[0] == cached
    assert pretrained_file("resnet18", None, pretrained=True) == cached


def test_read_state_dict_refuses_non_tensor_content(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(WeightsError, match="does not hold a state dict of tensors"):
        read_state_dict(path)


def timm_state(seed: int) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(seed)
    return {
        k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()
    }


def test_timm_backbone_loads_the_original_models_weights_file(tmp_path: Path) -> None:
    state = timm_state(1)
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    for name in ("timm/resnet18", "resnet18"):
        backbone = build_backbone(name, {"weights": str(path)}, TARGET)
        assert torch.equal(backbone.stages[0][0].weight, state["conv1.weight"]), name
        assert torch.equal(backbone.stages[4][-1][-1].conv2.weight, state["layer4.1.conv2.weight"]), name
    grey = build_backbone(
        "resnet18", {"weights": str(path)}, TargetSpec(kind="label", num_classes=2, in_channels=1)
    )
    assert torch.allclose(grey.stages[0][0].weight, state["conv1.weight"].sum(1, keepdim=True))  # adapted


def test_timm_pretrained_true_uses_the_cached_file(empty_caches: Path) -> None:
    from timm.models import get_pretrained_cfg

    state = timm_state(2)
    cached = empty_caches / "torch" / "checkpoints" / Path(get_pretrained_cfg("resnet18").url).name
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    backbone = build_backbone("resnet18", {"pretrained": True}, TARGET)
    assert torch.equal(backbone.stages[0][0].weight, state["conv1.weight"])
    assert backbone.data_config["mean"] == (0.485, 0.456, 0.406)
    with pytest.raises(WeightsError, match="never downloads"):
        build_backbone("vgg11", {"pretrained": True}, TARGET)


def test_pretrained_weights_set_the_tasks_normalisation_and_size(tmp_path: Path) -> None:
    from transferlab.service.spec import validate_spec_text

    path = tmp_path / "resnet18.safetensors"
    save_file(timm_state(3), str(path))
    text = f"""
name: pre
study: single
backbone: {{name: resnet18, weights: "{path}"}}
task: {{name: digits, channels: 3}}
"""
    vspec = validate_spec_text(text)
    assert vspec.task_options["mean"] == [0.485, 0.456, 0.406] and vspec.task_options["image_size"] == 224
    vspec = validate_spec_text(text.replace("channels: 3}", "channels: 1, image_size: 32}"))
    assert vspec.task_options["image_size"] == 32  # the spec's own setting wins
    assert vspec.task_options["mean"] == [pytest.approx((0.485 + 0.456 + 0.406) / 3)]
