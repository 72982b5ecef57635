"""Where each scale's tiles are read from: a block full of fine tiles is read once from
the finest level; a block at a tissue edge reads only its fine tiles' box from that level
and the rest from a coarser one. The tiles are the same either way (within JPEG error),
and every tile matches a reference read of that tile alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histoalign_wsi.cli import main
from histoalign_wsi.features import tile_source
from histoalign_wsi.features.store import ScaleView, open_store
from histoalign_wsi.features.tile_source import Block, Read, ReadPlan, ReadSettings, plan_reads, scale_tiles
from histoalign_wsi.slides.reader import Slide, open_slide

from ..conftest import jpeg_close, read_scaled

FINE = ReadPlan(level=0, downsample=1.0, factor=2, on_device=False)
MID = ReadPlan(level=1, downsample=4.0, factor=1, on_device=False)
COARSE = ReadPlan(level=1, downsample=4.0, factor=2, on_device=False)


def _scale(name: str, size0: int, coords: list[tuple[int, int]]) -> ScaleView:
    c = np.array(coords, np.int32).reshape(-1, 2)
    return ScaleView(name, size0 / 896, size0, c, np.ones(len(c), np.float16), {}, {})


def _block(scales: list[ScaleView]) -> Block:
    return Block(0, 0, 1792, tuple((0, len(sv.coords)) for sv in scales))


def test_a_block_full_of_fine_tiles_is_read_once() -> None:
    fine = [(x, y) for y in range(0, 1792, 448) for x in range(0, 1792, 448)]
    scales = [_scale("0.5", 448, fine), _scale("1", 896, [(0, 0), (896, 896)]), _scale("2", 1792, [(0, 0)])]
    reads = plan_reads(_block(scales), scales, [FINE, MID, COARSE])
    assert reads == [Read(0, 0, 1792, 1792, FINE, (0, 1, 2))]


def test_a_tissue_edge_block_reads_its_fine_tiles_alone() -> None:
    # two fine tiles in the bottom-right corner, two mid tiles, the coarse tile
    scales = [
        _scale("0.5", 448, [(1344, 896), (1344, 1344)]),
        _scale("1", 896, [(896, 0), (896, 896)]),
        _scale("2", 1792, [(0, 0)]),
    ]
    reads = plan_reads(_block(scales), scales, [FINE, MID, COARSE])
    # the fine tiles' box from level 0 (448 x 896 level px), then the whole block from
    # level 1 (448 x 448) for both coarser scales: 602,112 px against 3,211,264 for one read
    assert reads == [Read(1344, 896, 448, 896, FINE, (0,)), Read(0, 0, 1792, 1792, MID, (1, 2))]
    assert sum(r.cost for r in reads) == 448 * 896 + 448 * 448


def test_only_coarse_tiles_read_only_the_coarse_level() -> None:
    scales = [_scale("0.5", 448, []), _scale("1", 896, []), _scale("2", 1792, [(0, 0)])]
    assert plan_reads(_block(scales), scales, [FINE, MID, COARSE]) == [Read(0, 0, 1792, 1792, COARSE, (2,))]


def _tiles(slide: Slide, scales: list[ScaleView]) -> dict[int, np.ndarray]:
    got: dict[int, list[np.ndarray]] = {}
    for s, t in scale_tiles(slide, scales, ReadSettings(tile_px=224)):
        assert isinstance(t, np.ndarray) and t.dtype == np.uint8  # the CPU path needs no torch
        got.setdefault(s, []).append(t)
    return {s: np.concatenate(ts) for s, ts in got.items()}


@pytest.fixture(scope="module")
def planted_scales(planted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> list[ScaleView]:
    out = tmp_path_factory.mktemp("ts") / "tiles.zarr"
    assert main(["tile", str(planted[0]), "--out", str(out)]) == 0
    st = open_store(out)
    return [st.scale(n) for n in st.scale_names]


def test_split_reads_give_the_tiles_of_one_read(
    planted: tuple[Path, Path], planted_scales: list[ScaleView], monkeypatch: pytest.MonkeyPatch
) -> None:
    levels: list[int] = []
    real_read = Slide.read_scaled

    def spy(self: Slide, location: tuple[int, int], level: int, size: tuple[int, int], scale: int):  # type: ignore[no-untyped-def]
        levels.append(level)
        return real_read(self, location, level, size, scale)

    monkeypatch.setattr(Slide, "read_scaled", spy)
    with open_slide(planted[0]) as slide:
        split = _tiles(slide, planted_scales)
        assert 0 in levels and 1 in levels  # some blocks read their coarse tiles from level 1
        real_plan = tile_source.plan_reads

        def whole(block: Block, scales: list[ScaleView], plans: list[ReadPlan]) -> list[Read]:
            present = tuple(sorted(s for r in real_plan(block, scales, plans) for s in r.scales))
            return [Read(block.x0, block.y0, block.size0, block.size0, plans[present[0]], present)]

        monkeypatch.setattr(tile_source, "plan_reads", whole)
        levels.clear()
        one = _tiles(slide, planted_scales)
        assert set(levels) == {0}
        for s, sv in enumerate(planted_scales):
            assert split[s].shape == one[s].shape == (len(sv.coords), 3, 224, 224)
            jpeg_close(split[s], one[s])
            # and each tile against that tile read alone, in store order
            for i in (0, len(sv.coords) // 2, len(sv.coords) - 1):
                x, y = (int(v) for v in sv.coords[i])
                ref = read_scaled(slide, (x, y), sv.size0, 224)
                jpeg_close(split[s][i].transpose(1, 2, 0), ref)
