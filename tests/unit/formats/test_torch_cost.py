"""What ``init_kwargs`` make each request cost (issue 20): a pool with no weights froze a server."""

from __future__ import annotations

import pytest
import torch

from serving.errors import UntrustedArtifact
from serving.formats.pytorch import check_module_cost


def test_ordinary_vision_and_sequence_layers_pass() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, kernel_size=11, stride=4, padding=2),
        torch.nn.MaxPool2d(3, stride=2),
        torch.nn.Upsample(scale_factor=2),
        # NOTE: from review: FCN-32s upsamples by 32 (a scalar: one per image dimension).
        torch.nn.Upsample(scale_factor=32, mode="bilinear"),
        torch.nn.AdaptiveAvgPool2d((7, 7)),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 49, 3),
        torch.nn.Conv1d(1, 1, kernel_size=2048),
    )
    check_module_cost(net, "net")


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (torch.nn.MaxPool1d(10**6, stride=1), r"\(MaxPool1d\) has kernel_size=1000000"),
        # NOTE: one number is every spatial dimension: 80x80 is past the limit, 80 is not.
        (torch.nn.AvgPool2d(80), r"kernel_size=80, over the limit"),
        (torch.nn.Conv3d(1, 1, kernel_size=17), r"kernel_size=\(17, 17, 17\)"),
        (torch.nn.Upsample(scale_factor=128), "scale_factor=128.0"),
        (torch.nn.PixelShuffle(128), "upscale_factor=128"),
        (torch.nn.ConstantPad1d(10**6, 0.0), "padding="),
        (torch.nn.AdaptiveAvgPool1d(10**9), "output_size=1000000000"),
    ],
)
def test_a_layer_that_multiplies_each_request_is_refused_by_name(layer: torch.nn.Module, reason: str) -> None:
    wrapped = torch.nn.Sequential(torch.nn.Identity(), layer)
    with pytest.raises(UntrustedArtifact, match=reason):
        check_module_cost(wrapped, "v")
