"""The backbone contract, checked for every registered backbone (and a few timm models)."""

from __future__ import annotations

import math

import pytest
import torch

from transferlab.backbones.base import Backbone
from transferlab.engine.assembly import build_backbone
from transferlab.engine.model import TransferModel
from transferlab.heads.classify import classify
from transferlab.registry import BACKBONES
from transferlab.tasks.base import TargetSpec

TIMM_MODELS = ["timm/resnet18", "timm/mobilenetv3_small_050", "timm/efficientnet_b0"]
SIZE = 32


def backbone_names() -> list[str]:
    names = [n for n in BACKBONES.names() if n != "timm"]
    return names + TIMM_MODELS


TARGET = TargetSpec(kind="label", num_classes=3, in_channels=3, image_size=(SIZE, SIZE))


def make(name: str) -> Backbone:
    torch.manual_seed(0)
    return build_backbone(name, {}, TARGET)


def bn_with_stats(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


@pytest.fixture(params=backbone_names())
def backbone(request: pytest.FixtureRequest) -> Backbone:
    return make(request.param)


def test_feature_shapes_match_feature_info(backbone: Backbone) -> None:
    features = backbone(torch.randn(2, 3, SIZE, SIZE))
    assert len(features) == len(backbone.stages) == len(backbone.feature_info)
    for feat, info in zip(features, backbone.feature_info, strict=True):
        assert feat.shape[0] == 2
        assert feat.shape[1] == info.channels, info
        upper = math.ceil(SIZE / info.reduction)
        lower = 1 if info.receptive_field is None else (SIZE - info.receptive_field) // info.reduction + 1
        assert lower <= feat.shape[2] <= upper, (info, tuple(feat.shape))
    reductions = backbone.feature_info.reductions
    assert reductions == sorted(reductions)


def _train_steps(model: TransferModel, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model.train()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, SIZE, SIZE, generator=gen) * 2 + 0.5
        y = torch.randint(0, 3, (4,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model({"image": x})["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("bn_policy", ["frozen", "train"])
def test_every_depth_freezes_exactly_its_stages(backbone: Backbone, bn_policy: str) -> None:
    n = len(backbone.stages)
    initial = {k: v.clone() for k, v in backbone.state_dict().items()}
    for depth in range(n + 1):
        backbone.load_state_dict(initial)
        model = TransferModel(
            backbone, classify(backbone.feature_info, TARGET), freeze_depth=depth, bn_policy=bn_policy
        )
        for i, stage in enumerate(backbone.stages):
            for p in stage.parameters():
                assert p.requires_grad == (i >= depth), (depth, i)
        before = {k: v.clone() for k, v in backbone.state_dict().items()}
        _train_steps(model)
        after = backbone.state_dict()
        for key, value in before.items():
            stage = int(key.split(".")[1])
            is_param = key in dict(backbone.named_parameters())
            if stage < depth and (is_param or bn_policy == "frozen"):
                # Frozen means frozen: parameters always, buffers too under bn: frozen.
                assert torch.equal(after[key], value), (depth, key)
        trainable_changed = any(
            not torch.equal(after[k], before[k])
            for k, _ in backbone.named_parameters()
            if int(k.split(".")[1]) >= depth
        )
        assert (
            trainable_changed or depth == n or all(not list(s.parameters()) for s in backbone.stages[depth:])
        )
        if bn_policy == "train" and depth and bn_with_stats(backbone.stages[0]):
            key = next(k for k in before if k.startswith("stages.0.") and k.endswith("running_mean"))
            assert not torch.equal(after[key], before[key]), "bn: train should let frozen statistics adapt"


def test_frozen_prefix_builds_no_graph(backbone: Backbone) -> None:
    depth = len(backbone.stages) - 1  # leaves one trainable stage, whatever the backbone
    model = TransferModel(backbone, classify(backbone.feature_info, TARGET), freeze_depth=depth)
    model.train()
    feats = model.forward_features(torch.randn(2, 3, SIZE, SIZE))
    assert len(feats) == depth + 1
    assert all(not f.requires_grad for f in feats[:depth])
    assert feats[depth].requires_grad
    assert all(not s.training for s in model.frozen_stages)  # bn: frozen keeps them in eval mode
    assert backbone.stages[depth].training


def test_depth_beyond_backbone_is_rejected() -> None:
    backbone = make("lenet5")
    with pytest.raises(
        ValueError, match=r"depth 6 is deeper than backbone .* \(5 stages: c1, s2, c3, s4, c5\)"
    ):
        TransferModel(backbone, classify(backbone.feature_info, TARGET), freeze_depth=6)


def test_unknown_timm_model_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="did you mean.*resnet18"):
        make("timm/resnet81")


def test_convnet_options_shape_the_stages() -> None:
    backbone = build_backbone("convnet", {"widths": [4, 8], "blocks": 2}, TARGET)
    assert backbone.feature_info.channels == [4, 8]
    assert backbone.feature_info.reductions == [1, 2]
    assert backbone.feature_info[0].receptive_field == 5  # two 3x3 convs
    with pytest.raises(ValueError, match="has no option 'widthz'; its options are: in_channels, widths"):
        build_backbone("convnet", {"widthz": [4]}, TARGET)
