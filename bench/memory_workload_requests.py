"""The memory-limited benchmark's request streams: stations sending component images with a Zipf-like category mix,
one component per request (`make_requests`) or a board of many per request (`make_boards`, CoServe's tasks).

Pure code, no torch. `make_requests` draws each request's category from a Zipf law over the spec's categories
ranked by their spec probability, and gives it the category's table experts as its first calls (the dependent
calls follow at run time from the experts' outputs and `spec.dependencies`). `make_boards` draws every component of
a board the same way: a board spans many categories and chains, so a device holding few experts must choose what to
group across the boards of several stations. Each stream is a prefix stream: the first n requests of a longer stream
are the stream of n requests. `request_images` makes a request's image
deterministically from its image_seed: a smooth random pattern (sinusoids and blobs per channel, a little noise),
not white noise, so the seeded models' outputs vary from image to image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertmesh.errors import InvalidArgument
from expertmesh.bench.memory_workload_layout import zipf_probabilities
from expertmesh.experts.images import resize_to
from expertmesh.experts.spec import CoESpec

_CATEGORY_STREAM = 0x43415453
_IMAGE_STREAM = 0x494D4753


@dataclass(frozen=True)
class WorkloadComponent:
    category: str
    calls: tuple[str, ...]  # the category's experts (the table's first calls; dependents come from spec.dependencies)
    image_seed: int


@dataclass(frozen=True)
class WorkloadRequest:
    request_id: int
    station: int
    category: str
    calls: tuple[str, ...]  # the category's experts (the table's first calls; dependents come from spec.dependencies)
    image_seed: int
    components: tuple[WorkloadComponent, ...] = ()  # a board: every component (the fields above are the first's)

    @property
    def parts(self) -> tuple[WorkloadComponent, ...]:
        return self.components or (WorkloadComponent(self.category, self.calls, self.image_seed),)

    def part_id(self, k: int) -> str:
        """The answer key of component k (a single component's is the request id)."""
        return f"{self.request_id}/{k}" if self.components else str(self.request_id)


def image_seed_for(seed: int, request_id: int) -> int:
    """The image seed of request `request_id` of the stream `seed` (independent of the category draw)."""
    return int(np.random.SeedSequence([seed, _IMAGE_STREAM, request_id]).generate_state(1)[0])


def ranked_categories(spec: CoESpec) -> list[str]:
    """The spec's categories, most likely first (spec order among equals)."""
    order = sorted(range(len(spec.categories)), key=lambda i: (-spec.categories[i].probability, i))
    return [spec.categories[i].name for i in order]


def make_requests(spec: CoESpec, num_requests: int, *, seed: int, zipf_s: float = 1.1,
                  num_stations: int = 8) -> list[WorkloadRequest]:
    """`num_requests` requests: category of rank r with probability ~ 1/r**zipf_s, stations in turn (request i comes
    from station i % num_stations), each with its own image seed. Deterministic for (spec, seed, zipf_s)."""
    if num_requests < 0:
        raise InvalidArgument(f"num_requests is {num_requests}", field="num_requests", fix="ask for 0 or more requests")
    if not 0 <= zipf_s <= 10:
        raise InvalidArgument(f"zipf_s is {zipf_s}", field="zipf_s",
                              fix="use a Zipf exponent from 0 (uniform mix) to 10; 1.1 is the default skew")
    if num_stations < 1:
        raise InvalidArgument(f"num_stations is {num_stations}", field="num_stations", fix="use 1 or more stations")
    if seed < 0:
        raise InvalidArgument(f"seed is {seed}", field="seed", fix="use a seed of 0 or more")
    names = ranked_categories(spec)
    cdf = np.cumsum(zipf_probabilities(len(names), zipf_s))
    draws = np.random.default_rng([seed, _CATEGORY_STREAM]).random(num_requests)
    ranks = np.minimum(np.searchsorted(cdf, draws * cdf[-1], side="right"), len(names) - 1)
    table = {c.name: tuple(c.experts) for c in spec.categories}
    return [WorkloadRequest(request_id=i, station=i % num_stations, category=names[r], calls=table[names[r]],
                            image_seed=image_seed_for(seed, i))
            for i, r in enumerate(ranks.tolist())]


def make_boards(spec: CoESpec, num_boards: int, *, seed: int, components_per_board: int, zipf_s: float = 1.1,
                num_stations: int = 4) -> list[WorkloadRequest]:
    """`num_boards` boards of `components_per_board` components each, every component's category drawn as
    `make_requests` draws a request's (the same Zipf law), board i from station i % num_stations, each component with
    its own image seed. Deterministic for (spec, seed, zipf_s, components_per_board)."""
    if components_per_board < 1:
        raise InvalidArgument(f"components_per_board is {components_per_board}", field="components_per_board",
                              fix="use 1 or more components per board")
    flat = make_requests(spec, num_boards * components_per_board, seed=seed, zipf_s=zipf_s, num_stations=1)
    out = []
    for i in range(num_boards):
        parts = tuple(WorkloadComponent(r.category, r.calls, r.image_seed)
                      for r in flat[i * components_per_board:(i + 1) * components_per_board])
        out.append(WorkloadRequest(request_id=i, station=i % num_stations, category=parts[0].category,
                                   calls=parts[0].calls, image_seed=parts[0].image_seed, components=parts))
    return out


def pattern_image(image_seed: int, size_px: int) -> np.ndarray:
    """A smooth random RGB pattern, uint8 [size, size, 3], deterministic for image_seed."""
    rng = np.random.default_rng(image_seed)
    y, x = np.mgrid[0:size_px, 0:size_px] / size_px
    out = np.empty((size_px, size_px, 3))
    for c in range(3):
        freq = rng.uniform(-6, 6, (4, 2))
        phase = rng.uniform(0, 2 * np.pi, 4)
        amp = rng.uniform(0.2, 1.0, 4)
        layer = sum(a * np.sin(2 * np.pi * (fx * x + fy * y) + p) for (fx, fy), p, a in zip(freq, phase, amp))
        for cx, cy, r, a in zip(rng.uniform(0, 1, 3), rng.uniform(0, 1, 3), rng.uniform(0.05, 0.3, 3),
                                rng.uniform(-1.5, 1.5, 3)):
            layer = layer + a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        out[..., c] = layer
    out = (out - out.min()) / (np.ptp(out) + 1e-9)
    out = out * rng.uniform(0.5, 1.0) + rng.uniform(0.0, 0.3) + rng.normal(0.0, 0.03, out.shape)
    return (np.clip(out, 0.0, 1.0) * 255).astype(np.uint8)


def images_for_seed(spec: CoESpec, image_seed: int) -> dict[int, np.ndarray]:
    """The image at every expert input size, each resized from the largest (as the ingress resizes an upload)."""
    sizes = spec.input_sizes_px
    full = pattern_image(image_seed, max(sizes))
    return {s: resize_to(full, s)[None] for s in sizes}


def request_images(spec: CoESpec, request: WorkloadRequest) -> dict[int, np.ndarray]:
    """{input size: uint8 [N, S, S, 3]} for every input size of the spec, row k component k's image (N = 1 for a
    single component); deterministic from the image seeds."""
    per = [images_for_seed(spec, p.image_seed) for p in request.parts]
    return {size: np.concatenate([x[size] for x in per]) for size in spec.input_sizes_px}
