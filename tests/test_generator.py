"""The PCB image generator: deterministic per seed, every pair renders, polarity only on polarized parts."""

from __future__ import annotations

import numpy as np
import pytest

from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.pcb_aoi.dataset import Pool


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = np.asarray(generator.generate("soic", "solder_bridge", seed=7, index=3))
    b = np.asarray(generator.generate("soic", "solder_bridge", seed=7, index=3))
    c = np.asarray(generator.generate("soic", "solder_bridge", seed=8, index=3))
    d = np.asarray(generator.generate("soic", "solder_bridge", seed=7, index=4))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_every_pair_renders_at_the_native_size():
    pairs = generator.all_pairs()
    assert len(generator.COMPONENTS) >= 8
    assert len(pairs) == 9 * 5 + 4  # reversed polarity only on the 4 polarized types
    for comp, defect in pairs:
        img = generator.generate(comp, defect, 0, 0)
        assert img.size == (generator.IMAGE_SIZE_PX, generator.IMAGE_SIZE_PX) and img.mode == "RGB"


def test_reversed_polarity_only_on_polarized_parts():
    with pytest.raises(ValueError, match="does not apply"):
        generator.generate("chip_resistor", "reversed_polarity", 0, 0)
    with pytest.raises(ValueError, match="unknown component"):
        generator.defects_for("bga")
    assert "reversed_polarity" in generator.defects_for("diode")


def test_defects_change_the_image():
    ok = np.asarray(generator.generate("qfp", "ok", 0, 0), dtype=np.int16)
    missing = np.asarray(generator.generate("qfp", "missing", 0, 0), dtype=np.int16)
    assert np.abs(ok - missing).mean() > 5


def test_pool_is_order_independent_and_parallel_equals_serial():
    counts = {("led", "ok"): 5, ("connector", "missing"): 3}
    serial = Pool.generate(counts, seed=1, workers=1, progress=False)
    parallel = Pool.generate(dict(reversed(list(counts.items()))), seed=1, workers=2, progress=False)
    for pair in counts:
        assert np.array_equal(serial.images[pair], parallel.images[pair])
        assert np.array_equal(serial.images[pair][2], np.asarray(generator.generate(*pair, 1, 2)))
