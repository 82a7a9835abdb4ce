"""Volumes as 2D cases: a 2D network trains on (and predicts) the axial slices of 3D cases,
and its slice predictions are stacked back into a volume."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

CACHED_VOLUMES = 256


class VolumeSlices:
    """``source[i]`` is one (H, W) axial slice of the volumes of ``volumes`` ((D, H, W) each),
    slices of volume 0 first; ``depths`` are the volumes' D, known from their headers. Recently
    read volumes stay in memory, because training visits each volume's slices in random order."""

    def __init__(self, volumes: Any, depths: Sequence[int]) -> None:
        self.volumes = volumes
        self.index = [(v, s) for v, d in enumerate(depths) for s in range(int(d))]
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        v, s = self.index[int(i)]
        if v in self._cache:
            self._cache.move_to_end(v)
        else:
            self._cache[v] = np.asarray(self.volumes[v])
            if len(self._cache) > CACHED_VOLUMES:
                self._cache.popitem(last=False)
        return self._cache[v][s]

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers start with an empty cache
        return {**self.__dict__, "_cache": OrderedDict()}
