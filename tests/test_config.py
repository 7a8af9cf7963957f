import pytest

from toma_export import ToMAConfig


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=1.0), r"ratio must be in \[0, 1\)"),
    (dict(ratio=-0.1), r"ratio must be in \[0, 1\)"),
    (dict(tile=(0, 4)), "tile must be two positive ints"),
    (dict(tile=(4, 4, 4)), "tile must be two positive ints"),
    (dict(scale=0), "scale must be positive"),
    (dict(blocks=[]), "blocks must name at least one pattern"),
    (dict(levels=0), "levels must be an int >= 1"),
    (dict(sublayers=("attn", "norm")), "sublayers must be a non-empty subset"),
    (dict(sublayers=()), "sublayers must be a non-empty subset"),
    (dict(merge_steps=0), "period >= 1"),
    (dict(merge_steps=[]), "non-negative step indices"),
    (dict(merge_steps=[3, -1]), "non-negative step indices"),
    (dict(dst_every=0), "dst_every must be an int >= 1"),
    (dict(weights_every=1.5), "weights_every must be an int >= 1"),
])
def test_bad_configurations_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToMAConfig(**kwargs)


def test_normalisation():
    cfg = ToMAConfig(tile=8, blocks="single_*", sublayers=("mlp", "attn"), merge_steps=[5, 0, 5])
    assert cfg.tile == (8, 8)
    assert cfg.blocks == ("single_*",)
    assert cfg.sublayers == ("attn", "mlp")
    assert cfg.merge_steps == (0, 5)
    assert ToMAConfig() == ToMAConfig() and hash(ToMAConfig())     # frozen: usable as a cache key
