import pytest
import torch

from instanas.space import (
    FORCED_DEFAULT_MODULE,
    ChildArchitecture,
    SearchSpace,
    apply_empty_cell_rule,
    scale_channels,
)


def test_paper_cifar_space_matches_spec():
    space = SearchSpace()  # defaults: the paper's 32 px CIFAR space with s2 = 1
    cells = space.cells()
    assert len(cells) == 17 and space.num_modules == 5
    assert [c.out_channels for c in cells] == [
        16,
        24,
        24,
        32,
        32,
        32,
        64,
        64,
        64,
        64,
        96,
        96,
        96,
        160,
        160,
        160,
        320,
    ]
    assert space.final_size == 4
    # Stage-first cells change shape and get the forced default; the others may be identity.
    forced = [i for i, c in enumerate(cells) if c.forced_default]
    assert forced == [0, 1, 3, 6, 10, 13, 16]


def test_imagenet_space_final_map_is_7():
    space = SearchSpace(
        input_size=224,
        stem_stride=2,
        stages=(
            (16, 1, 1),
            (24, 2, 2),
            (32, 3, 2),
            (64, 4, 2),
            (96, 3, 1),
            (160, 3, 2),
            (320, 1, 1),
        ),
    )
    assert space.final_size == 7


def test_width_multiplier_rounding():
    assert scale_channels(32, 1.4) == 48
    assert scale_channels(24, 1.0) == 24
    assert scale_channels(16, 0.25) % 4 == 0


def test_architecture_string_and_bits_round_trip():
    arch = ChildArchitecture(((0,), (1, 3), (), (4,), (0, 1, 2, 3, 4)))
    text = arch.to_string()
    assert text == "0-13-_-4-01234"
    assert ChildArchitecture.from_string(text) == arch
    assert ChildArchitecture.from_bits(arch.to_bits()) == arch
    assert ChildArchitecture.from_policy(arch.to_policy()) == arch
    assert len(arch.to_bits()) == 25


def test_bad_architecture_string():
    with pytest.raises(ValueError, match="module ids"):
        ChildArchitecture.from_string("0-7-_")


def test_empty_cell_rule():
    forced = torch.tensor([True, False, True])
    policy = torch.zeros(2, 3, 5, dtype=torch.bool)
    policy[1, 0, 2] = True
    resolved = apply_empty_cell_rule(policy, forced)
    # Image 0: empty forced cells get module 4; the shape-preserving cell stays empty.
    assert resolved[0, 0].tolist() == [False] * 4 + [True]
    assert not resolved[0, 1].any()
    assert resolved[0, 2, FORCED_DEFAULT_MODULE]
    # Image 1: a selected module means no default is added.
    assert resolved[1, 0].tolist() == [False, False, True, False, False]


def test_fingerprint_changes_with_space():
    assert SearchSpace().fingerprint() != SearchSpace(width=0.5).fingerprint()
    assert SearchSpace.from_dict(SearchSpace().to_dict()) == SearchSpace()
