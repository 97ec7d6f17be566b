"""The backbone contract, checked for every registered backbone (and a few other timm models).

Each backbone is built once per module (a module-scoped fixture; every test starts from its initial
state dict) at the smallest convenient input: 32 px, or the smallest side it accepts when that is
larger, found by running it on the meta device (no name lists). One optimiser step per freeze depth
proves the freezing contract; ``bn: train`` runs on a subset, being the same code path.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from transferlab.backbones.base import Backbone
from transferlab.backbones.torchvision_zoo import GoogLeNetInputTransform
from transferlab.backbones.weights import WeightsError
from transferlab.engine.assembly import build_backbone
from transferlab.engine.model import TransferModel
from transferlab.heads.classify import classify
from transferlab.registry import BACKBONES
from transferlab.tasks.base import TargetSpec

# timm models beyond the named aliases: the generic `timm/NAME` path with timm's own stage names.
TIMM_MODELS = ["timm/mobilenetv3_small_050"]
SIZE = 32
# `bn: train` differs from `bn: frozen` only in the frozen stages' mode; a few families suffice.
BN_TRAIN = ["convnet", "resnet20", "shufflenet_v2", "mobilenetv2", "resnet18", "googlenet"]
# The architectures as published (reference, with classifier) at 224 px: parameters, classes.
PUBLISHED = {
    "alexnet": (61.1e6, 1000),
    "vgg16": (138.4e6, 1000),
    "resnet50": (25.6e6, 1000),
    "mobilenetv2": (3.5e6, 1000),
    "resnet20": (0.27e6, 10),
    "resnet152": (60.2e6, 1000),
    "googlenet": (6.6e6, 1000),
    "efficientnet_b0": (5.3e6, 1000),
}
# Smallest input sides that docs/backbones.md lists (and that the probe must find).
MIN_SIDE = {"alexnet": 63, "inception_v3": 75, "googlenet": 15}
DOCS = Path(__file__).parents[1] / "docs" / "backbones.md"


pytestmark = pytest.mark.usefixtures("one_thread")


def reads_images(name: str) -> bool:
    """1-D backbones (transferlab.backbones.sequence) have their own contract test in test_sequence.py."""
    return BACKBONES.get(name).__module__ != "transferlab.backbones.sequence"


def backbone_names() -> list[str]:
    names = [n for n in BACKBONES.names() if n != "timm" and reads_images(n)]
    return names + TIMM_MODELS


TARGET = TargetSpec(kind="label", num_classes=3, in_channels=3, image_size=(SIZE, SIZE))


def make(name: str, **options: object) -> Backbone:
    torch.manual_seed(0)
    return build_backbone(name, options, TARGET)


def accepts_side(backbone: Backbone, side: int) -> bool:
    """Whether ``backbone`` runs on a ``side`` x ``side`` input: shapes only, on the meta device."""
    tensors = [*backbone.named_parameters(), *backbone.named_buffers()]
    meta = {k: torch.empty_like(v, device="meta") for k, v in tensors}
    x = torch.empty(2, backbone.in_channels, side, side, device="meta")
    try:
        torch.func.functional_call(backbone, meta, (x,))
    except (RuntimeError, ValueError):
        return False
    return True


def smallest_side(backbone: Backbone, low: int = 0, limit: int = 1024) -> int:
    """The smallest square input side ``backbone`` accepts; ``low`` is known to fail (or is 0).

    Bisection, assuming that every side above the smallest fits too.
    """
    high = limit
    assert accepts_side(backbone, high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if accepts_side(backbone, mid) else (mid, high)
    return high


def bn_with_stats(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


class Built:
    """A backbone built once, its initial state and the input side the tests use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.backbone = make(name)
        self.initial = {k: v.clone() for k, v in self.backbone.state_dict().items()}
        self.side = SIZE if accepts_side(self.backbone, SIZE) else smallest_side(self.backbone, SIZE)

    def fresh(self) -> Backbone:
        self.backbone.load_state_dict(self.initial)
        self.backbone.requires_grad_(True)
        return self.backbone.train()


@pytest.fixture(scope="module", params=backbone_names())
def built(request: pytest.FixtureRequest) -> Built:
    return Built(request.param)


@pytest.fixture
def backbone(built: Built) -> Backbone:
    return built.fresh()


def test_feature_shapes_match_feature_info(built: Built, backbone: Backbone) -> None:
    size = built.side
    features = backbone(torch.randn(2, 3, size, size))
    assert len(features) == len(backbone.stages) == len(backbone.feature_info)
    for feat, info in zip(features, backbone.feature_info, strict=True):
        assert feat.shape[0] == 2
        assert feat.shape[1] == info.channels, info
        upper = math.ceil(size / info.reduction)
        lower = 1 if info.receptive_field is None else (size - info.receptive_field) // info.reduction + 1
        assert lower <= feat.shape[2] <= upper, (info, tuple(feat.shape))
    reductions = backbone.feature_info.reductions
    assert reductions == sorted(reductions)


def _train_step(model: TransferModel, size: int) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, size, size, generator=gen) * 2 + 0.5  # off-centre: BatchNorm statistics move
    y = torch.randint(0, 3, (4,), generator=gen)
    loss = torch.nn.functional.cross_entropy(model({"image": x})["logits"], y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _stage_of(key: str) -> int:
    return int(key.split(".")[1])  # "stages.<i>.…"


def check_every_depth(built: Built, bn_policy: str) -> None:
    backbone = built.backbone
    n = len(backbone.stages)
    params = dict(backbone.named_parameters())
    for depth in range(n + 1):
        backbone = built.fresh()
        model = TransferModel(
            backbone, classify(backbone.feature_info, TARGET), freeze_depth=depth, bn_policy=bn_policy
        )
        for i, stage in enumerate(backbone.stages):
            for p in stage.parameters():
                assert p.requires_grad == (i >= depth), (depth, i)
        before = {k: v.clone() for k, v in backbone.state_dict().items()}
        _train_step(model, built.side)
        after = backbone.state_dict()
        for key, value in before.items():
            if _stage_of(key) < depth and (key in params or bn_policy == "frozen"):
                # Frozen means frozen: parameters always, buffers too under bn: frozen.
                assert torch.equal(after[key], value), (depth, key)
        trainable_changed = any(not torch.equal(after[k], before[k]) for k in params if _stage_of(k) >= depth)
        assert (
            trainable_changed or depth == n or all(not list(s.parameters()) for s in backbone.stages[depth:])
        ), depth
        if bn_policy == "train" and depth and bn_with_stats(backbone.stages[0]):
            key = next(k for k in before if k.startswith("stages.0.") and k.endswith("running_mean"))
            assert not torch.equal(after[key], before[key]), "bn: train should let frozen statistics adapt"


def test_every_depth_freezes_exactly_its_stages(built: Built) -> None:
    check_every_depth(built, "frozen")


@pytest.mark.parametrize("name", BN_TRAIN)
def test_bn_train_keeps_weights_and_adapts_statistics(name: str) -> None:
    check_every_depth(Built(name), "train")


def test_frozen_prefix_builds_no_graph(built: Built, backbone: Backbone) -> None:
    # Leaves the last stage with parameters trainable (after it may come parameter-free ones).
    depth = max(i for i, stage in enumerate(backbone.stages) if any(True for _ in stage.parameters()))
    model = TransferModel(backbone, classify(backbone.feature_info, TARGET), freeze_depth=depth)
    model.train()
    feats = model.forward_features(torch.randn(2, 3, built.side, built.side))
    assert len(feats) == len(backbone.stages)
    assert all(not f.requires_grad for f in feats[:depth])
    assert all(f.requires_grad for f in feats[depth:])
    assert all(not s.training for s in model.frozen_stages)  # bn: frozen keeps them in eval mode
    assert backbone.stages[depth].training


def test_reference_is_the_published_model(built: Built) -> None:
    backbone = built.backbone
    if backbone.reference is None:
        assert BACKBONES.entry(built.name).source != "transferlab" or built.name in ("lenet5", "convnet")
        return
    with torch.device("meta"):  # shapes and counts only: no memory, no initialisation time
        reference = backbone.reference()
        logits = reference(torch.empty(1, backbone.in_channels, 224, 224))
    params = sum(p.numel() for p in reference.parameters())
    assert logits.ndim == 2 and logits.shape[0] == 1
    assert params >= sum(p.numel() for p in backbone.parameters())  # the stages plus a classifier
    if built.name in PUBLISHED:
        published, classes = PUBLISHED[built.name]
        assert logits.shape[1] == classes
        assert abs(params - published) <= 0.005 * published, (params, published)


@pytest.mark.parametrize(("name", "side"), sorted(MIN_SIDE.items()))
def test_smallest_input_side(name: str, side: int) -> None:
    backbone = make(name)
    assert smallest_side(backbone) == side
    backbone.eval()
    with torch.no_grad():
        backbone(torch.randn(1, 3, side, side))  # really runs, not just on the meta device


def test_docs_list_every_builtin_backbone() -> None:
    text = DOCS.read_text()
    missing = [e.name for e in BACKBONES.entries() if e.source == "transferlab" and f"`{e.name}`" not in text]
    assert not missing, f"docs/backbones.md does not list {missing}"


# (name, whether the first conv is torchvision's RGB one adapted); timm and cifar nets build for C.
@pytest.mark.parametrize(
    ("name", "adapted"),
    [
        ("alexnet", True),
        ("googlenet", True),
        ("shufflenet_v2", True),
        ("resnet20", False),
        ("resnet18", False),
    ],
)
def test_other_input_channels(name: str, adapted: bool) -> None:
    grey = make(name, in_channels=1)
    rgb = make(name)
    first_grey, first_rgb = (
        next(m for m in b.modules() if isinstance(m, torch.nn.Conv2d)) for b in (grey, rgb)
    )
    assert first_grey.in_channels == 1
    if adapted:  # one channel: the RGB filters, summed (timm's adapt_input_conv)
        assert torch.allclose(first_grey.weight, first_rgb.weight.sum(1, keepdim=True))
    side = SIZE if accepts_side(grey, SIZE) else smallest_side(grey, SIZE)
    grey.eval()
    with torch.no_grad():
        features = grey(torch.randn(1, 1, side, side))
    assert [f.shape[1] for f in features] == grey.feature_info.channels
    assert grey.reference is not None
    with torch.device("meta"):
        assert grey.reference()(torch.empty(1, 1, 224, 224)).ndim == 2


def test_torchvision_pretrained_weights_come_from_the_local_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models import ShuffleNet_V2_X0_5_Weights, shufflenet_v2_x0_5

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="never downloads. Looked for .*shufflenetv2_x0.5"):
        make("shufflenet_v2", width=0.5, pretrained=True)
    torch.manual_seed(1)
    published = shufflenet_v2_x0_5()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(published.state_dict(), cache / Path(ShuffleNet_V2_X0_5_Weights.DEFAULT.url).name)
    backbone = make("shufflenet_v2", width=0.5, pretrained=True)
    assert torch.equal(backbone.stages[2][0].branch1[0].weight, published.stage3[0].branch1[0].weight)


def test_googlenet_input_transform_is_torchvisions() -> None:
    from torchvision.models import GoogLeNet

    with torch.device("meta"):
        net = GoogLeNet(transform_input=True, aux_logits=False, init_weights=False)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(GoogLeNetInputTransform()(x), net._transform_input(x), atol=1e-6)


def test_alias_is_the_timm_model_with_named_stages() -> None:
    alias, generic = make("resnet18"), make("timm/resnet18")
    assert alias.feature_info.names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert generic.feature_info.names == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert alias.feature_info.channels == generic.feature_info.channels
    assert alias.feature_info.reductions == generic.feature_info.reductions
    shapes = {k: v.shape for k, v in alias.state_dict().items()}
    assert shapes == {k: v.shape for k, v in generic.state_dict().items()}
    assert generic.reference is not None
    assert "stem, layer1" in BACKBONES.entry("resnet50").description


def test_vgg_keeps_timm_levels_with_a_parameter_free_pool5() -> None:
    vgg = make("vgg11")
    assert vgg.feature_info.names == ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5"]
    assert vgg.feature_info.reductions == [1, 2, 4, 8, 16, 32]
    assert not list(vgg.stages[5].parameters())


def test_cifar_options() -> None:
    def count(b: Backbone) -> int:
        assert b.reference is not None
        with torch.device("meta"):
            return sum(p.numel() for p in b.reference().parameters())

    resnet, plain = make("resnet20"), make("plain20")
    assert count(resnet) == count(plain) == 269_722  # option A shortcuts have no parameters
    assert count(make("resnet20", shortcut="B")) == 269_722 + 2_752  # two 1x1 projections with BN
    deeper = make("resnet20", depth=32)
    assert len(deeper.stages[1]) == 5 and deeper.feature_info.channels == [16, 16, 32, 64]
    plain.load_state_dict(resnet.state_dict())  # same weights: only the shortcuts differ
    x = torch.randn(2, 3, SIZE, SIZE)
    assert not torch.allclose(resnet.eval()(x)[-1], plain.eval()(x)[-1])
    with pytest.raises(ValueError, match=r"depth must be 6n \+ 2"):
        make("resnet20", depth=21)
    with pytest.raises(ValueError, match="shortcut must be 'A'"):
        make("resnet20", shortcut="C")


def test_shufflenet_width_sets_the_channels() -> None:
    assert make("shufflenet_v2", width=0.5).feature_info.channels == [24, 48, 96, 192, 1024]
    with pytest.raises(ValueError, match="width must be one of 0.5, 1.0, 1.5, 2.0"):
        make("shufflenet_v2", width=0.75)


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
