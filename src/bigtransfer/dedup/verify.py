"""The verification of a candidate pair on aligned pixels: is one image an edited copy of the other?

Both images are canonical grey thumbnails (pixels.py), slightly blurred first: resampling and JPEG
destroy the finest detail of a small image, and a copy keeps the rest. One is slid over the other
within a small window of shifts (a copy moved by a pixel or two), then placed at the sub-pixel
peak of the correlation (a pixel of a 64 px image is half a canonical pixel); for copies cropped
by a few percent, it is also shrunk to a few smaller scales and slid over the whole other image.
At each alignment the window is regressed on the template (a gain and an offset: brightness and
contrast edits) and what is left is the residual, in grey levels. Resampling and misalignment
leave a residual in proportion to the image's contrast, re-encoding (JPEG) a roughly constant
amount of noise. So a pair is a copy when, at some alignment,

    residual <= relative * contrast + absolute            (grey levels, on the canonical thumbnail)

and residual <= per_detail * detail of the flatter image (a copy keeps its detail: two
different hazy horizons agree on their ramp and differ by about as much detail as they have, so
a tolerance from contrast alone lets them pass), with the gain between them within
[1/max_gain, max_gain], and both images above min_contrast and min_detail: a nearly uniform
image, or one that is only a smooth ramp (sky, out-of-focus background), has no structure to
check, since all such images correlate with each other, and is never called a copy of anything
(only identical thumbnails pair them, see candidates.py).
Every match is then held to its detail directly (detail_correlation): at the best alignment, the
two images' fine detail, less the line profile (a horizon, a stroke) that explains most of it,
must correlate. A copy carries its original's detail, even its faint texture and noise; two crops
of one hazy horizon share the horizon and the haze, and their remaining detail is unrelated.
A match that the detail bound decided and that uses over half of what it allows is also asked
what its residual looks like (residual_structure): an edit leaves fine-grained noise that a blur
averages away, two different crops of one hazy scene leave their different faint structure.
Because every image is first reduced to the canonical size, the rule means the same thing for a
28 px digit and a 500 px photo. The pairs of a batch are checked together, one grouped
convolution per alignment hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from .pixels import CANONICAL

DETAIL_SCALE = 3.0  # canonical pixels: structure coarser than a Gaussian of this size is not "detail"


@dataclass(frozen=True)
class Tolerance:
    """What a copy may differ by (defaults chosen on a tuning set: benchmarks/dedup_real.py --tune)."""

    relative: float = 0.10  # residual allowed per grey level of contrast (misalignment, resampling)
    absolute: float = 0.5  # plus this many grey levels (re-encoding noise)
    min_contrast: float = 4.0  # both images need at least this standard deviation (grey levels)
    min_detail: float = 1.0  # ... and this much of it finer than DETAIL_SCALE (smooth ramps all look alike)
    per_detail: float = 1.0  # ... and at most this fraction of the flatter image's detail
    max_gain: float = 1.5  # contrast may change by at most this factor
    max_structure: float = 0.7  # a faint match using over half its allowed residual: at most this share of it
    structure_from: float = 0.5  # ... may survive a blur (see residual_structure); from this much used residual
    min_detail_correlation: float = 0.5  # a copy's detail, less its line profile, correlates at least this much
    shift: int = 2  # canonical pixels each way (a pixel at 16 px, a fraction of one at 500 px)
    smooth: float = 0.7  # Gaussian blur (canonical pixels) first: edits destroy the finest detail
    scales: tuple[float, ...] = (1.0, 0.96, 0.92, 0.88, 0.84)  # template sizes tried (below 1: crops of a few %)

    def check(self) -> None:
        """Raise ValueError for a tolerance that cannot work."""
        if min(self.relative, self.absolute, self.min_contrast, self.min_detail, self.smooth) < 0 or self.max_gain < 1:
            raise ValueError("tolerances must be non-negative and max_gain at least 1")
        if self.per_detail <= 0:
            raise ValueError("per_detail must be positive")
        if not 0 < self.max_structure <= 1 or self.structure_from < 0:
            raise ValueError("max_structure (--max-residual-structure) must be in (0, 1], structure_from >= 0")
        if not -1 <= self.min_detail_correlation <= 1:
            raise ValueError("min_detail_correlation (--min-detail-correlation) must be in [-1, 1]")
        if not 0 <= self.shift < CANONICAL // 4:
            raise ValueError(f"the shift search must be between 0 and {CANONICAL // 4 - 1} pixels")
        if not self.scales or any(not 0.5 <= s <= 1 for s in self.scales):
            raise ValueError("scales must be in [0.5, 1]")


@dataclass
class Verdicts:
    """Per pair: is it a copy, how much of the allowed residual it used, at which scale."""

    copy: np.ndarray  # bool [P]
    used: np.ndarray  # float32 [P]: residual / allowed residual at the best alignment (<= 1: a copy)
    residual: np.ndarray  # float32 [P]: grey levels left at that alignment
    correlation: np.ndarray  # float32 [P]: normalised correlation there
    scale: np.ndarray  # float32 [P]: template scale of that alignment (1: aligned, below 1: rescaled)
    featureless: np.ndarray  # bool [P]: one of the two is too flat to check (never a copy)
    by_detail: np.ndarray  # bool [P]: the flatter image's detail, not the contrast, bounds the allowed residual
    structure: np.ndarray  # float32 [P]: residual_structure() where it was checked, NaN elsewhere
    detail_correlation: np.ndarray  # float32 [P]: detail_correlation() where it was checked, NaN elsewhere

    def __len__(self) -> int:
        return len(self.copy)

    def take(self, which: np.ndarray) -> Verdicts:
        """The verdicts of some pairs (a mask or indexes)."""
        return Verdicts(*(getattr(self, f.name)[which] for f in fields(self)))

    @staticmethod
    def concat(parts: list[Verdicts]) -> Verdicts:
        if not parts:
            empty = np.zeros(0, np.float32)
            return Verdicts(np.zeros(0, bool), empty, empty, empty, empty, np.zeros(0, bool), np.zeros(0, bool),
                            empty, empty)
        return Verdicts(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Verdicts)))


def smoothed(thumbnails: np.ndarray, sigma: float) -> torch.Tensor:
    """float32 [P, C, C]: the thumbnails blurred with a Gaussian of `sigma` pixels (edges repeated)."""
    x = torch.from_numpy(np.ascontiguousarray(thumbnails)).float()
    if sigma <= 0:
        return x
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = torch.exp(-torch.arange(-radius, radius + 1.0).pow(2) / (2 * sigma**2))
    taps = taps / taps.sum()
    x = F.pad(x[:, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(F.conv2d(x, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))
    return x[:, 0]


def detail(smooth: torch.Tensor) -> torch.Tensor:
    """[P]: the standard deviation (grey levels) of what a Gaussian of DETAIL_SCALE blurs away."""
    return (smooth - smoothed(smooth.numpy(), DETAIL_SCALE)).flatten(1).std(dim=1, unbiased=False)


def featureless(thumbnails: np.ndarray, tol: Tolerance) -> np.ndarray:
    """bool [N]: images too flat for the pixel check (below min_contrast or min_detail)."""
    x = smoothed(thumbnails, tol.smooth)
    flat = x.flatten(1).std(dim=1, unbiased=False) < tol.min_contrast
    return (flat | (detail(x) < tol.min_detail)).numpy()


def _window_sums(integral: torch.Tensor, m: int) -> torch.Tensor:
    """[P, h, w] sums over every m x m window, from an integral image [P, C + 1, C + 1]."""
    return integral[:, m:, m:] - integral[:, :-m, m:] - integral[:, m:, :-m] + integral[:, :-m, :-m]


def _integral(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x.cumsum(1).cumsum(2), (1, 0, 1, 0))


def _scores(cross: torch.Tensor, t_var: torch.Tensor, w_var: torch.Tensor, ceiling: torch.Tensor, tol: Tolerance):
    """(used, residual, correlation) from a template's variance, a window's and their covariance;
    `ceiling` is the most residual the pair's detail allows; `used` is infinite where the pair
    fails the gain or contrast condition."""
    w_std, t_std = w_var.sqrt(), t_var.sqrt()
    correlation = (cross / (t_std * w_std).clamp_min(1e-6)).clamp(-1, 1)
    residual = w_std * (1 - correlation * correlation).clamp_min(0).sqrt()
    allowed = torch.minimum(tol.relative * w_std + tol.absolute, ceiling)
    used = residual / allowed.clamp_min(1e-6)
    gain = cross / t_var.clamp_min(1e-6)  # least-squares gain from template to window
    valid = (correlation > 0) & (gain >= 1 / tol.max_gain) & (gain <= tol.max_gain) & \
        (w_std >= tol.min_contrast) & (t_std >= tol.min_contrast)
    return torch.where(valid, used, torch.full_like(used, float("inf"))), residual, correlation


def _peak_offset(surface: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-pixel (dy, dx) [P] of each surface's peak at flat index `best`, from a parabola through
    it and its neighbours along each axis (0 at the surface's border)."""
    pairs, h, w = surface.shape
    y, x = best // w, best % w
    rows = torch.arange(pairs)

    def along(pos, size, at):
        inside = (pos > 0) & (pos < size - 1)
        lo, hi = at((pos - 1).clamp(0, size - 1)), at((pos + 1).clamp(0, size - 1))
        mid = at(pos)
        curvature = lo - 2 * mid + hi
        offset = torch.where(curvature < -1e-9, 0.5 * (lo - hi) / curvature.clamp_max(-1e-9), torch.zeros_like(mid))
        return torch.where(inside, offset.clamp(-0.5, 0.5), torch.zeros_like(mid))

    dy = along(y, h, lambda yy: surface[rows, yy, x])
    dx = along(x, w, lambda xx: surface[rows, y, xx])
    return y.float() + dy, x.float() + dx


def _window_at(source: torch.Tensor, top: torch.Tensor, left: torch.Tensor, m: int) -> torch.Tensor:
    """[P, m, m]: each source sampled (bicubic) on the m x m grid starting at a fractional corner."""
    side = source.shape[-1]
    steps = torch.arange(m, dtype=torch.float32)
    ys = (top[:, None] + steps) * (2 / (side - 1)) - 1  # align_corners=True: pixel centres at +-1
    xs = (left[:, None] + steps) * (2 / (side - 1)) - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
    return F.grid_sample(source[:, None], grid, mode="bicubic", padding_mode="border", align_corners=True)[:, 0]


def _centred_template(template_src: torch.Tensor, scale: float, tol: Tolerance) -> tuple[torch.Tensor, torch.Tensor]:
    """(template minus its mean [P, m, m], its variance [P]) of one hypothesis: at scale 1 the
    image without a border of the shift search, below 1 the whole image shrunk to that scale."""
    side = template_src.shape[-1]
    if scale >= 1.0:
        r = tol.shift
        template = template_src[:, r:side - r, r:side - r]
    else:
        m = round(scale * side)
        template = F.interpolate(template_src[:, None], size=(m, m), mode="bilinear", antialias=True,
                                 align_corners=False)[:, 0]
    centred = template - template.mean(dim=(1, 2), keepdim=True)
    return centred, (centred * centred).mean(dim=(1, 2))


def _hypothesis(template_src: torch.Tensor, window_src: torch.Tensor, integrals, scale: float,
                ceiling: torch.Tensor, tol: Tolerance):
    """(used, residual, correlation) [P] at the best alignment of one template scale: the best
    whole-pixel position, or the sub-pixel one at the correlation's peak if that is better."""
    centred, t_var = _centred_template(template_src, scale, tol)
    m = centred.shape[-1]
    count = m * m
    # Sum over each window of template * window; the template is centred, so this is the covariance.
    cross = F.conv2d(window_src[None], centred[:, None], groups=len(centred))[0] / count  # [P, h, w]
    w_mean = _window_sums(integrals[0], m) / count
    w_var = (_window_sums(integrals[1], m) / count - w_mean * w_mean).clamp_min(0)
    used, residual, correlation = _scores(cross, t_var[:, None, None], w_var, ceiling[:, None, None], tol)
    best = used.flatten(1).argmin(dim=1, keepdim=True)
    whole = [v.flatten(1).gather(1, best)[:, 0] for v in (used, residual, correlation)]
    # A copy resampled off the pixel grid (moved by one pixel of a 64 px image is half a
    # canonical pixel) lines up only between whole pixels: look there too.
    peak = torch.where(torch.isfinite(used), correlation, torch.full_like(correlation, -2)).flatten(1).argmax(dim=1)
    top, left = _peak_offset(correlation, peak)
    window = _window_at(window_src, top, left, m)
    window = window - window.mean(dim=(1, 2), keepdim=True)
    fine = _scores((centred * window).mean(dim=(1, 2)), t_var, (window * window).mean(dim=(1, 2)), ceiling, tol)
    better = fine[0] < whole[0]
    return tuple(torch.where(better, f, w) for f, w in zip(fine, whole))


@torch.no_grad()
def verify(a: np.ndarray, b: np.ndarray, tol: Tolerance = Tolerance(), chunk: int = 2048) -> Verdicts:
    """Judge each pair (a[p], b[p]) of canonical uint8 thumbnails [P, C, C]; see the module doc."""
    tol.check()
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two [P, C, C] arrays of thumbnails, got {a.shape} and {b.shape}")
    out = {k: np.empty(len(a), dtype=np.float32) for k in ("used", "residual", "correlation", "scale")}
    flat, by_detail = np.zeros(len(a), bool), np.zeros(len(a), bool)
    for start in range(0, len(a), chunk):
        x, y = smoothed(a[start:start + chunk], tol.smooth), smoothed(b[start:start + chunk], tol.smooth)
        integrals = {id(v): (_integral(v.double()).float(), _integral((v * v).double()).float())
                     for v in (x, y)}
        contrast = torch.minimum(x.flatten(1).std(dim=1, unbiased=False), y.flatten(1).std(dim=1, unbiased=False))
        least_detail = torch.minimum(detail(x), detail(y))
        featureless = (least_detail < tol.min_detail) | (contrast < tol.min_contrast)
        ceiling = tol.per_detail * least_detail
        best = None
        for scale in tol.scales:
            for template, window in ((x, y), (y, x)):  # either one may be the cropped copy
                used, residual, corr = _hypothesis(template, window, integrals[id(window)], scale, ceiling, tol)
                here = torch.stack([used, residual, corr, torch.full_like(used, scale)])
                if best is None:
                    best = here
                else:
                    better = used < best[0]
                    best = torch.where(better[None], here, best)
        best[0] = torch.where(featureless, torch.full_like(best[0], float("inf")), best[0])
        stop = start + len(x)
        flat[start:stop] = featureless.numpy()
        by_detail[start:stop] = (ceiling < tol.relative * contrast + tol.absolute).numpy()
        for k, row in zip(("used", "residual", "correlation", "scale"), best.numpy()):
            out[k][start:stop] = row
    copy = out["used"] <= 1.0
    structure = np.full(len(a), np.nan, dtype=np.float32)
    agreement = np.full(len(a), np.nan, dtype=np.float32)
    checks = tol.max_structure < 1, tol.min_detail_correlation > -1
    check = np.flatnonzero(copy) if any(checks) else np.zeros(0, int)
    for rows, aligned in _aligned_groups(a[check], b[check], out["scale"][check], tol) if len(check) else []:
        pairs = check[rows]
        if checks[1]:  # every match: the detail, not only a shared horizon, must agree
            agreement[pairs] = _detail_agreement(aligned).numpy()
            copy[pairs] &= agreement[pairs] >= tol.min_detail_correlation
        # A faint match that uses much of its allowed residual must leave fine-grained noise, not structure.
        faint = copy[pairs] & by_detail[pairs] & (out["used"][pairs] > tol.structure_from) if checks[0] \
            else np.zeros(0, bool)
        if faint.any():
            structure[pairs[faint]] = _blurred_share(aligned.take(np.flatnonzero(faint))).numpy()
            copy[pairs[faint]] &= structure[pairs[faint]] <= tol.max_structure
    return Verdicts(copy=copy, used=out["used"], residual=out["residual"], correlation=out["correlation"],
                    scale=out["scale"], featureless=flat, by_detail=by_detail, structure=structure,
                    detail_correlation=agreement)


RESIDUAL_BLUR = 1.5  # canonical pixels: what is left of a copy's residual after this blur is noise that averaged out
SUBPIXEL = (-0.5, -0.25, 0.0, 0.25, 0.5)  # offsets (pixels) tried around the best whole-pixel position


@dataclass
class Aligned:
    """Pairs placed at their best alignment: template and window [P, m, m], each less its mean, and
    the residual [P, m, m] of the window after the least-squares gain; `side` is the thumbnails' size."""

    template: torch.Tensor
    window: torch.Tensor
    residual: torch.Tensor
    side: int

    def take(self, which: np.ndarray) -> Aligned:
        which = torch.from_numpy(np.asarray(which))
        return Aligned(self.template[which], self.window[which], self.residual[which], self.side)


def _residual(centred: torch.Tensor, t_var: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """[P, m, m]: the (centred) window minus the template at the least-squares gain."""
    return window - ((centred * window).mean(dim=(1, 2)) / t_var)[:, None, None] * centred


def _least_residual(template_src: torch.Tensor, window_src: torch.Tensor, scale: float, tol: Tolerance):
    """(residual std [P], Aligned) at the smallest residual of the template (at `scale`) over every
    whole-pixel position in the window, then sub-pixel offsets around the best of them."""
    side = template_src.shape[-1]
    centred, t_var = _centred_template(template_src, scale, tol)
    t_var = t_var.clamp_min(1e-6)
    m = centred.shape[-1]
    best_std = torch.full((len(centred),), float("inf"))
    best_window = torch.zeros_like(centred)
    top = torch.zeros(len(centred))
    left = torch.zeros(len(centred))

    def keep(window, y, x):
        nonlocal best_std, best_window, top, left
        window = window - window.mean(dim=(1, 2), keepdim=True)
        std = _residual(centred, t_var, window).flatten(1).std(dim=1, unbiased=False)
        better = std < best_std
        best_std = torch.where(better, std, best_std)
        best_window = torch.where(better[:, None, None], window, best_window)
        top, left = torch.where(better, y, top), torch.where(better, x, left)

    for y in range(side - m + 1):
        for x in range(side - m + 1):
            keep(window_src[:, y:y + m, x:x + m], torch.full_like(top, y), torch.full_like(left, x))
    whole_top, whole_left = top.clone(), left.clone()
    for dy in SUBPIXEL:
        for dx in SUBPIXEL:
            y, x = whole_top + dy, whole_left + dx
            keep(_window_at(window_src, y, x, m), y, x)
    return best_std, Aligned(centred, best_window, _residual(centred, t_var, best_window), side)


def _aligned_groups(a: np.ndarray, b: np.ndarray, scale: np.ndarray, tol: Tolerance) -> list[tuple[np.ndarray, Aligned]]:
    """Each pair (a[p], b[p]) at its best alignment, at the template scale verify() chose, with
    whichever image as the template leaves the smaller residual: (rows, Aligned) per scale."""
    x, y = smoothed(a, tol.smooth), smoothed(b, tol.smooth)
    groups = []
    for s in np.unique(scale):
        rows = np.flatnonzero(scale == s)
        (std_a, one), (std_b, other) = (_least_residual(t, w, float(s), tol)
                                        for t, w in ((x[rows], y[rows]), (y[rows], x[rows])))
        pick = (std_a <= std_b)[:, None, None]
        groups.append((rows, Aligned(*(torch.where(pick, getattr(one, f), getattr(other, f))
                                       for f in ("template", "window", "residual")), x.shape[-1])))
    return groups


def _blurred_share(aligned: Aligned) -> torch.Tensor:
    """[P]: the share of the residual (its standard deviation) that survives a RESIDUAL_BLUR blur."""
    blurred = smoothed(aligned.residual.numpy(), RESIDUAL_BLUR * aligned.side / CANONICAL)
    std = aligned.residual.flatten(1).std(dim=1, unbiased=False)
    return blurred.flatten(1).std(dim=1, unbiased=False) / std.clamp_min(1e-6)


_LINES: dict[int, list[torch.Tensor]] = {}


def _line_index(m: int) -> list[torch.Tensor]:
    """Per orientation (rows, columns, both diagonals): the line each pixel of an m x m image is on."""
    if m not in _LINES:
        y, x = np.mgrid[0:m, 0:m]
        _LINES[m] = [torch.from_numpy(line.ravel()) for line in (y, x, y + x, y - x + m - 1)]
    return _LINES[m]


def _less_line_means(images: torch.Tensor, line: torch.Tensor) -> torch.Tensor:
    """[P, m*m]: each image less the mean of the line (of one orientation) each pixel is on."""
    flat = images.flatten(1)
    lines = int(line.max()) + 1
    sums = torch.zeros(len(flat), lines).index_add_(1, line, flat)
    counts = torch.zeros(lines).index_add_(0, line, torch.ones(flat.shape[1]))
    return flat - (sums / counts)[:, line]


def _detail_agreement(aligned: Aligned) -> torch.Tensor:
    """[P]: the correlation of the pair's fine detail (finer than DETAIL_SCALE) less the line profile
    (rows, columns or a diagonal, whichever explains most of the two) that both share."""
    sigma = DETAIL_SCALE * aligned.side / CANONICAL
    t = aligned.template - smoothed(aligned.template.numpy(), sigma)
    w = aligned.window - smoothed(aligned.window.numpy(), sigma)
    best = torch.full((len(t),), float("inf"))
    result = torch.zeros(len(t))
    for line in _line_index(t.shape[-1]):
        tl, wl = _less_line_means(t, line), _less_line_means(w, line)  # each has mean 0: its lines' means are
        left = (tl + wl).pow(2).mean(dim=1)  # what this profile leaves of the two (the removal is linear)
        corr = (tl * wl).mean(dim=1) / (tl.pow(2).mean(dim=1) * wl.pow(2).mean(dim=1)).sqrt().clamp_min(1e-6)
        better = left < best
        best, result = torch.where(better, left, best), torch.where(better, corr, result)
    return result


@torch.no_grad()
def residual_structure(a: np.ndarray, b: np.ndarray, scale: np.ndarray, tol: Tolerance = Tolerance()) -> np.ndarray:
    """float32 [P]: how much of a pair's residual at its best alignment (at the template scale
    verify() chose, either image the template) survives a blur, as a fraction of it. What an edit
    leaves (resampling, JPEG noise) is fine-grained and mostly blurs away; two different images that
    merely share a smooth ramp differ by their structure, which does not."""
    result = np.ones(len(a), dtype=np.float32)
    for rows, aligned in _aligned_groups(a, b, scale, tol):
        result[rows] = _blurred_share(aligned).numpy()
    return result


@torch.no_grad()
def detail_correlation(a: np.ndarray, b: np.ndarray, scale: np.ndarray, tol: Tolerance = Tolerance()) -> np.ndarray:
    """float32 [P]: at a pair's best alignment, the correlation of the two images' fine detail after
    removing the line profile that explains most of it. A copy keeps its original's detail, faint
    texture and noise included (measured on the tuning halves: at least 0.53); two crops of one hazy
    horizon share the horizon line and the haze, and what detail is left is unrelated (about 0)."""
    result = np.zeros(len(a), dtype=np.float32)
    for rows, aligned in _aligned_groups(a, b, scale, tol):
        result[rows] = _detail_agreement(aligned).numpy()
    return result
