"""The evaluation report: ``report.json`` (numbers) and ``report.html`` (one self-contained page).

Input is the dict returned by :func:`faceshield.eval.protocol.evaluate`. The HTML page needs no network and
no other file: CSS is inline, plots (matplotlib, Agg) and face crops are embedded as base64 PNG data URIs,
so it can be mailed, attached to an issue or opened offline years later.

The page holds, for a person and for a researcher:

1. the run's settings (pairs, judges, thresholds, command) and a short guide to reading the numbers;
2. a summary table per method (dodging PSR per judge and FAR, impersonation PSR per target, image quality),
   with the unprotected floor as a reference row;
3. a robustness table (dodging PSR at the loosest FAR after JPEG / resize / blur);
4. plots: dodging PSR per judge, PSR against SSIM (the strength/quality trade-off), impersonation per target;
5. before/after face crops with the judge's similarity and an amplified difference image.

PSR (protection success rate) values are fractions in [0, 1]; they are shown as percentages.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from faceshield.errors import FaceshieldError
from faceshield.fileio import write_text_atomic

log = logging.getLogger(__name__)

# Keys of an example kept in the JSON; the image arrays and landmarks only go into the HTML.
EXAMPLE_JSON_KEYS = ("method", "judge", "pair", "before", "after")
ROBUSTNESS_LABELS = {"jpeg75": "JPEG q=75", "resize0.5": "resize ×0.5", "blur1": "blur σ=1"}
CROP_PX = 160  # side of the face crops shown on the page
CROP_SCALE = 2.2  # crop side = this × the eye–mouth span
DIFF_GAIN = 10  # |protected − original| is multiplied by this so an 8-bit perturbation of ±2 shows


# --------------------------------------------------------------------------------------------- JSON


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; non-finite floats become null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "detach"):  # a torch tensor
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return str(obj)


def to_json(result: dict) -> str:
    """The evaluation result as indented JSON, without the example images.

    Examples keep only ``method``, ``judge``, ``pair``, ``before`` and ``after``; everything else is kept.
    NaN / infinite numbers are written as ``null`` so the file is strict JSON.
    """
    data = {k: v for k, v in result.items() if k != "examples"}
    data["examples"] = [{k: ex.get(k) for k in EXAMPLE_JSON_KEYS} for ex in result.get("examples", [])]
    return json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n"


# Everything that makes two evaluations comparable: same pairs, judges, thresholds and targets.
_PROTOCOL_KEYS = ("judges", "thresholds", "n_dodging", "n_impersonation_per_target", "targets", "floor")


def merge_results(results: list[dict]) -> dict:
    """One result (one table, one page) from evaluations of different methods under the same protocol, e.g.
    one run per method so that a long benchmark can be resumed method by method.

    Raises:
        FaceshieldError: nothing to merge, the runs differ in pairs, judges, thresholds or targets (naming which),
            or two runs report the same method.
    """
    if not results:
        raise FaceshieldError("no evaluation results to merge")
    merged = {**results[0], "methods": {}, "examples": []}
    for r in results:
        for key in _PROTOCOL_KEYS:
            if r.get(key) != merged.get(key):
                raise FaceshieldError(f"cannot merge evaluations with different {key}: "
                                      f"{merged.get(key)!r} vs {r.get(key)!r}")
        twice = set(r["methods"]) & set(merged["methods"])
        if twice:
            raise FaceshieldError(f"method {sorted(twice)[0]} is in more than one of the evaluations to merge")
        merged["methods"].update(r["methods"])
        merged["examples"] += r.get("examples", [])
    merged["config"] = {**merged.get("config", {}), "methods": list(merged["methods"])}
    if len(results) > 1:  # each run's command made one part only; the caller may name the one that made the whole
        merged["config"].pop("command", None)
    return merged


# ------------------------------------------------------------------------------------- formatting


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _far_label(key: str) -> str:
    """``"0.01"`` → ``"1e-2"``."""
    value = float(key)
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = value / 10**exponent
    return f"{mantissa:g}e{exponent}"


def _target_label(name: str) -> str:
    return Path(name).stem


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _far_keys(result: dict) -> list[str]:
    """FAR keys of the thresholds, loosest (largest) first."""
    keys: list[str] = []
    for per_far in result.get("thresholds", {}).values():
        keys += [k for k in per_far if k not in keys]
    return sorted(keys, key=float, reverse=True)


def _primary_far(fars: list[str]) -> str | None:
    """The FAR the headline numbers use: 1e-2 when measured, else the loosest."""
    for key in fars:
        if math.isclose(float(key), 1e-2):
            return key
    return fars[0] if fars else None


def _psr_cell(x: float | None, *, strong: bool = False) -> str:
    """A PSR cell shaded from white (0 %) to green (100 %), so a table reads at a glance."""
    if x is None:
        return '<td class="na">—</td>'
    alpha = 0.08 + 0.5 * max(0.0, min(1.0, x))
    cls = ' class="strong"' if strong else ""
    return f'<td{cls} style="background:rgba(46,160,67,{alpha:.2f})">{_pct(x)}</td>'


# ---------------------------------------------------------------------------------- measurements


def _dodging(method: dict, judge: str, far: str) -> float | None:
    return method["judges"].get(judge, {}).get("dodging", {}).get(far)


def _robust(method: dict, judge: str, kind: str, far: str) -> float | None:
    return method["judges"].get(judge, {}).get("robustness", {}).get(kind, {}).get(far)


def _impersonation(method: dict, judges: list[str], target: str, far: str) -> float | None:
    """Impersonation PSR toward ``target``, mean over the judges that measured it."""
    return _mean([method["judges"].get(j, {}).get("impersonation", {}).get(target, {}).get(far) for j in judges])


def _floor(result: dict, kind: str) -> dict:
    """The unprotected floor, ``{judge: {far: PSR}}`` for ``kind`` "dodging" or "impersonation" ({} if absent)."""
    return (result.get("floor") or {}).get(kind) or {}


def _has_impersonation(result: dict) -> bool:
    return bool(result.get("targets")) and any(
        "impersonation" in entry for m in result["methods"].values() for entry in m["judges"].values())


def _has_robustness(result: dict) -> bool:
    return any("robustness" in entry for m in result["methods"].values() for entry in m["judges"].values())


# --------------------------------------------------------------------------------------------- plots


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter
    except ImportError as exc:
        raise FaceshieldError(
            "the HTML report draws its plots with matplotlib, which is not installed: "
            "pip install 'faceshield[eval]'") from exc
    return Figure, FigureCanvasAgg, PercentFormatter


def _figure_png(fig, canvas_cls) -> tuple[str, int]:
    """``fig`` as a PNG data URI, drawn at 2× for sharp text on high-density screens, and its CSS width."""
    canvas_cls(fig)  # the Agg canvas, per figure: no pyplot, no global backend switch
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=200, bbox_inches="tight")
    data = buffer.getvalue()
    width, _ = Image.open(io.BytesIO(data)).size
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), width // 2


def _plot_figure(plot: tuple[str, int], caption: str) -> str:
    # The figure gets the plot's width so the caption wraps under the plot and plots sit side by side.
    uri, width = plot
    return (f'<figure class="plot" style="width:{width}px"><img class="plot" width="{width}" '
            f'alt="{_esc(caption)}" src="{uri}"><figcaption>{_esc(caption)}</figcaption></figure>')


def _colours(specs: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
               "#17becf", "#7f7f7f"]
    return {s: palette[i % len(palette)] for i, s in enumerate(specs)}


FLOOR_COLOUR = "#b0b0b0"


def _plot_dodging(result: dict, mpl) -> tuple[str, int]:
    """Grouped bars: dodging PSR per judge (and the mean), one bar per method plus the floor; one panel per FAR."""
    Figure, Canvas, PercentFormatter = mpl
    judges, specs, fars = result["judges"], list(result["methods"]), _far_keys(result)
    colours = _colours(specs)
    groups = judges + ["mean"]
    series = [("unprotected", FLOOR_COLOUR, lambda j, f: _floor(result, "dodging").get(j, {}).get(f))]
    series += [(s, colours[s], lambda j, f, m=result["methods"][s]: _dodging(m, j, f)) for s in specs]
    panel = max(4.0, len(groups) * (0.28 * len(series) + 0.4))
    fig = Figure(figsize=(panel * len(fars) + 2.0, 3.6))
    axes = fig.subplots(1, len(fars), squeeze=False)[0]
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for ax, far in zip(axes, fars):
        for i, (label, colour, value) in enumerate(series):
            vals = [value(j, far) for j in judges]
            vals.append(_mean(vals))
            heights = [np.nan if v is None else v for v in vals]
            ax.bar(x - 0.4 + width * (i + 0.5), heights, width, label=label, color=colour,
                   edgecolor="white", linewidth=0.5)
        ax.set_xticks(x, groups, rotation=20 if max(len(g) for g in groups) > 10 else 0, ha="right"
                      if max(len(g) for g in groups) > 10 else "center")
        ax.set_ylim(0, 1.05)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_title(f"Dodging PSR at FAR {_far_label(far)}", fontsize=11)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_ylabel("protection success rate")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _figure_png(fig, Canvas)


def _plot_tradeoff(result: dict, mpl) -> tuple[str, int] | None:
    """Mean dodging PSR (primary FAR) against mean SSIM, one point per method; presets of a method joined."""
    Figure, Canvas, PercentFormatter = mpl
    judges, far = result["judges"], _primary_far(_far_keys(result))
    points = []
    for spec, m in result["methods"].items():
        s = m.get("quality", {}).get("ssim")
        p = _mean([_dodging(m, j, far) for j in judges])
        if s is not None and p is not None:
            points.append((spec, s, p))
    if not points:
        return None
    bases: dict[str, list[tuple[str, float, float]]] = {}
    for pt in points:
        bases.setdefault(pt[0].partition("@")[0], []).append(pt)
    colours = _colours(list(bases))
    fig = Figure(figsize=(5.6, 3.8))
    ax = fig.subplots()
    for base, pts in bases.items():
        pts.sort(key=lambda t: t[1])
        xs, ys = [t[1] for t in pts], [t[2] for t in pts]
        ax.plot(xs, ys, "-o" if len(pts) > 1 else "o", color=colours[base], markersize=7)
        for spec, sx, sy in pts:
            ax.annotate(spec, (sx, sy), textcoords="offset points", xytext=(6, 5), fontsize=8)
    floor = _mean([_floor(result, "dodging").get(j, {}).get(far) for j in judges])
    if floor is not None:
        ax.plot([1.0], [floor], "X", color="#555555", markersize=9)
        ax.annotate("unprotected", (1.0, floor), textcoords="offset points", xytext=(-6, 8), fontsize=8,
                    ha="right")
    lo = min([t[1] for t in points] + [1.0])
    ax.set_xlim(lo - 0.08 * (1.0 - lo) - 0.005, 1.0 + 0.04 * (1.0 - lo) + 0.005)
    ax.set_ylim(-0.03, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("SSIM to the original (1 = identical) →")
    ax.set_ylabel(f"dodging PSR, mean over judges, FAR {_far_label(far)}")
    ax.set_title("Protection against image quality", fontsize=11)
    ax.grid(alpha=0.3)
    # No legend: every point is labelled, and a legend inside the axes reads as one more data point.
    return _figure_png(fig, Canvas)


def _plot_impersonation(result: dict, mpl) -> tuple[str, int] | None:
    """Grouped bars: impersonation PSR (mean over judges, primary FAR) per target, one bar per method."""
    if not _has_impersonation(result):
        return None
    Figure, Canvas, PercentFormatter = mpl
    judges, specs, targets = result["judges"], list(result["methods"]), result["targets"]
    far = _primary_far(_far_keys(result))
    colours = _colours(specs)
    groups = [_target_label(t) for t in targets] + ["mean"]
    fig = Figure(figsize=(max(4.0, 0.28 * len(groups) * (len(specs) + 1)) + 1.4, 3.8))
    ax = fig.subplots()
    width = 0.8 / len(specs)
    x = np.arange(len(groups))
    for i, spec in enumerate(specs):
        vals = [_impersonation(result["methods"][spec], judges, t, far) for t in targets]
        vals.append(_mean(vals))
        ax.bar(x - 0.4 + width * (i + 0.5), [np.nan if v is None else v for v in vals], width, label=spec,
               color=colours[spec], edgecolor="white", linewidth=0.5)
    floor = _mean([_floor(result, "impersonation").get(j, {}).get(far) for j in judges])
    if floor is not None:
        ax.axhline(floor, color="#555555", linestyle="--", linewidth=1, label="unprotected (all targets)")
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("target identity")
    ax.set_ylabel("impersonation PSR")
    ax.set_title(f"Impersonation PSR at FAR {_far_label(far)}, mean over judges", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _figure_png(fig, Canvas)


# ------------------------------------------------------------------------------------- face crops


def face_crop_box(landmarks: Any, shape: tuple[int, ...], scale: float = CROP_SCALE) -> tuple[int, int, int, int]:
    """A square ``(left, top, right, bottom)`` around a face from its 5 landmarks.

    Args:
        landmarks: 5×2 (or 1×5×2) (x, y) pixels in faceshield's order: eyes, nose, mouth corners.
        shape: the photo's shape (H, W, ...); the box is clamped to fit when the photo is big enough.
        scale: side = ``scale`` × the distance from the eyes' midpoint to the mouth's midpoint
            (2.2 covers forehead to chin on a frontal face).

    Returns:
        Integer box, side ≥ 8 px; it may reach outside the photo only when the photo is smaller than the box.
    """
    if hasattr(landmarks, "detach"):  # a torch tensor, possibly on an accelerator
        landmarks = landmarks.detach().cpu().numpy()
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if pts.shape[0] != 5:
        raise ValueError(f"expected 5 landmarks, got {pts.shape[0]}")
    eyes, mouth = pts[:2].mean(axis=0), pts[3:5].mean(axis=0)
    span = max(float(np.linalg.norm(mouth - eyes)), 0.5 * float(np.linalg.norm(pts[1] - pts[0])), 4.0)
    side = int(round(scale * span))
    cx, cy = (eyes + mouth) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    h, w = shape[:2]
    # Slide the square inside the photo rather than padding, so the crop shows only real pixels.
    left = min(max(left, 0), max(w - side, 0)) if side <= w else left
    top = min(max(top, 0), max(h - side, 0)) if side <= h else top
    return left, top, left + side, top + side


def _crop(rgb: np.ndarray, box: tuple[int, int, int, int], size: int = CROP_PX) -> Image.Image:
    # Image.crop pads outside the photo with black, which only happens for photos smaller than the box.
    return Image.fromarray(rgb).crop(box).resize((size, size), Image.Resampling.BICUBIC)


def _png_uri(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _example_card(ex: dict, result: dict) -> str:
    judge = ex.get("judge", "?")
    before, after = ex.get("before"), ex.get("after")
    far = _primary_far(_far_keys(result))
    threshold = result.get("thresholds", {}).get(judge, {}).get(far) if far else None
    verdict = ""
    if threshold is not None and after is not None:
        protected = after <= threshold
        verdict = (f'<div class="verdict {"ok" if protected else "bad"}">'
                   f'{"not matched: protected" if protected else "still matched"} '
                   f'(threshold {threshold:.3f} at FAR {_far_label(far)})</div>')
    sims = f'similarity {_num(before, ".3f")} → <b>{_num(after, ".3f")}</b>'
    head = (f'<div class="card-head"><b>{_esc(ex.get("method", "?"))}</b> · pair {_esc(ex.get("pair", "?"))} · '
            f'judge {_esc(judge)}</div><div>{sims}</div>{verdict}')
    original, protected_rgb = ex.get("original"), ex.get("protected")
    if original is None or protected_rgb is None:
        return f'<div class="card">{head}<div class="na">(images not stored in this result)</div></div>'
    original, protected_rgb = np.asarray(original, dtype=np.uint8), np.asarray(protected_rgb, dtype=np.uint8)
    if original.shape != protected_rgb.shape:
        raise FaceshieldError(f"example {ex.get('pair')}: original {original.shape} and protected "
                              f"{protected_rgb.shape} photos differ in size")
    lm = ex.get("landmarks")
    box = face_crop_box(lm, original.shape) if lm is not None else (0, 0, original.shape[1], original.shape[0])
    delta = np.abs(protected_rgb.astype(np.int16) - original.astype(np.int16))
    amplified = np.clip(delta * DIFF_GAIN, 0, 255).astype(np.uint8)
    linf, mean_abs = int(delta.max()), float(delta.mean())
    figs = [(_crop(original, box), "original"), (_crop(protected_rgb, box), "protected"),
            (_crop(amplified, box), f"|difference| × {DIFF_GAIN}")]
    cells = "".join(f'<figure><img src="{_png_uri(img)}" width="{CROP_PX}" height="{CROP_PX}" '
                    f'alt="{_esc(cap)}"><figcaption>{_esc(cap)}</figcaption></figure>' for img, cap in figs)
    stats = (f'<div class="small">whole photo: max |Δ| = {linf}/255, mean |Δ| = {mean_abs:.2f}/255</div>')
    return f'<div class="card">{head}<div class="crops">{cells}</div>{stats}</div>'


# --------------------------------------------------------------------------------------------- tables


def _summary_table(result: dict) -> str:
    judges, fars, methods = result["judges"], _far_keys(result), result["methods"]
    targets = result.get("targets", []) if _has_impersonation(result) else []
    imp_cols = len(targets) + 1 if targets else 0
    head1 = '<tr><th rowspan="3" class="left">method</th>'
    head1 += f'<th colspan="{len(fars) * (len(judges) + 1)}">dodging PSR</th>'
    if targets:
        head1 += f'<th colspan="{len(fars) * imp_cols}">impersonation PSR (mean over judges)</th>'
    head1 += ('<th colspan="6">image quality</th></tr>')
    head2, head3 = "<tr>", "<tr>"
    for far in fars:
        head2 += f'<th colspan="{len(judges) + 1}" class="group">FAR {_far_label(far)}</th>'
        head3 += "".join(f"<th>{_esc(j)}</th>" for j in judges) + '<th class="strong">mean</th>'
    if targets:
        for far in fars:
            head2 += f'<th colspan="{imp_cols}" class="group">FAR {_far_label(far)}</th>'
            head3 += "".join(f'<th title="{_esc(t)}">{_esc(_target_label(t))}</th>' for t in targets)
            head3 += '<th class="strong">mean</th>'
    head2 += ('<th rowspan="2">PSNR<br>dB</th><th colspan="2">SSIM</th><th rowspan="2">BRISQUE<br>'
              '<span class="small">lower = better</span></th><th rowspan="2">seconds<br>per photo</th></tr>')
    head3 += "<th>mean</th><th>min</th></tr>"

    rows = []
    cells = '<td class="left"><i>unprotected (floor)</i></td>'
    for far in fars:
        vals = [_floor(result, "dodging").get(j, {}).get(far) for j in judges]
        cells += "".join(_psr_cell(v) for v in vals) + _psr_cell(_mean(vals), strong=True)
    if targets:
        for far in fars:
            cells += '<td class="na" title="the floor is measured over all targets together">—</td>' * len(targets)
            floor_imp = _mean([_floor(result, "impersonation").get(j, {}).get(far) for j in judges])
            cells += _psr_cell(floor_imp, strong=True)
    cells += "<td>∞</td><td>1.000</td><td>1.000</td><td>—</td><td>—</td>"
    rows.append(f'<tr class="floor">{cells}</tr>')
    for spec, m in methods.items():
        cells = f'<td class="left"><b>{_esc(spec)}</b></td>'
        for far in fars:
            vals = [_dodging(m, j, far) for j in judges]
            cells += "".join(_psr_cell(v) for v in vals) + _psr_cell(_mean(vals), strong=True)
        if targets:
            for far in fars:
                vals = [_impersonation(m, judges, t, far) for t in targets]
                cells += "".join(_psr_cell(v) for v in vals) + _psr_cell(_mean(vals), strong=True)
        q, qmin = m.get("quality", {}), m.get("quality_min", {})
        cells += (f'<td>{_num(q.get("psnr"), ".1f")}</td><td>{_num(q.get("ssim"), ".3f")}</td>'
                  f'<td>{_num(qmin.get("ssim"), ".3f")}</td><td>{_num(q.get("brisque"), ".1f")}</td>'
                  f'<td>{_num(q.get("seconds"), ".2f")}</td>')
        rows.append(f"<tr>{cells}</tr>")
    psnr_min = "".join(
        f'<li><b>{_esc(s)}</b>: worst photo PSNR {_num(m.get("quality_min", {}).get("psnr"), ".1f")} dB, '
        f'SSIM {_num(m.get("quality_min", {}).get("ssim"), ".3f")}</li>' for s, m in methods.items())
    return (f'<div class="scroll"><table class="results">{head1}{head2}{head3}{"".join(rows)}</table></div>'
            f'<details><summary>worst-case quality per method</summary><ul>{psnr_min}</ul></details>')


def _robustness_table(result: dict) -> str:
    judges, methods = result["judges"], result["methods"]
    far = _primary_far(_far_keys(result))
    kinds = list(ROBUSTNESS_LABELS)
    head1 = (f'<tr><th rowspan="2" class="left">method</th><th colspan="{1 + len(kinds)}">mean over judges</th>'
             + "".join(f'<th colspan="{1 + len(kinds)}" class="group">judge {_esc(j)}</th>' for j in judges)
             + "</tr>")
    sub = '<th>as saved</th>' + "".join(f"<th>{ROBUSTNESS_LABELS[k]}</th>" for k in kinds)
    head2 = "<tr>" + sub * (1 + len(judges)) + "</tr>"
    rows = []
    for spec, m in methods.items():
        cells = f'<td class="left"><b>{_esc(spec)}</b></td>'
        cells += _psr_cell(_mean([_dodging(m, j, far) for j in judges]), strong=True)
        cells += "".join(_psr_cell(_mean([_robust(m, j, k, far) for j in judges]), strong=True) for k in kinds)
        for j in judges:
            cells += _psr_cell(_dodging(m, j, far)) + "".join(_psr_cell(_robust(m, j, k, far)) for k in kinds)
        rows.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table class="results">{head1}{head2}{"".join(rows)}</table></div>'


def _independent_table(result: dict) -> str:
    """Dodging PSR per held-out judge, same pipeline beside the independent pipeline, with the floor of each."""
    info = result.get("independent") or {}
    judges = [j for j in result["judges"] if j in (info.get("thresholds") or {})]
    far = _primary_far(_far_keys(result))
    floor_same, floor_ind = _floor(result, "dodging"), (result.get("floor") or {}).get("independent") or {}
    head = ('<tr><th rowspan="2" class="left">method</th>'
            + "".join(f'<th colspan="2">{_esc(j)}</th>' for j in judges) + "<th colspan=\"2\">mean</th></tr><tr>"
            + "<th>same</th><th>independent</th>" * (len(judges) + 1) + "</tr>")

    def row(name: str, same: dict, ind: dict, css: str = "") -> str:
        pairs = [(same.get(j, {}).get(far), (ind.get(j) or {}).get("dodging", {}).get(far)) for j in judges]
        cells = "".join(_psr_cell(a) + _psr_cell(b) for a, b in pairs)
        cells += _psr_cell(_mean([a for a, _ in pairs]), strong=True) + _psr_cell(_mean([b for _, b in pairs]),
                                                                                  strong=True)
        return f'<tr class="{css}"><td class="left">{name}</td>{cells}</tr>'

    rows = [row("<i>unprotected (floor)</i>", floor_same, floor_ind, "floor")]
    for spec, m in result["methods"].items():
        same = {j: m["judges"].get(j, {}).get("dodging", {}) for j in judges}
        ind = {j: m["judges"].get(j, {}).get("independent") for j in judges}
        rows.append(row(_esc(spec), same, ind))
    no_face = {spec: sum((m["judges"].get(j, {}).get("independent") or {}).get("no_face", 0) for j in judges)
               for spec, m in result["methods"].items()}
    note = "; ".join(f"{_esc(k)}: {v}" for k, v in no_face.items() if v)
    note = (f'<p class="small">Protected faces the independent detector did not find (counted as dodged): '
            f'{note}.</p>') if note else ""
    return f'<table class="results">{head}{"".join(rows)}</table>{note}'


def _config_section(result: dict) -> str:
    cfg = result.get("config", {}) or {}
    judges, fars = result["judges"], _far_keys(result)
    items = [
        ("methods", ", ".join(result["methods"]) or "—"),
        ("dodging pairs", f'{result.get("n_dodging", "?")} (from {cfg.get("pairs_dir", "?")})'),
    ]
    if result.get("targets"):
        items.append(("impersonation", f'{result.get("n_impersonation_per_target", "?")} sources × '
                                       f'{len(result["targets"])} targets (from {cfg.get("targets_dir", "?")}): '
                                       + ", ".join(result["targets"])))
    else:
        items.append(("impersonation", "not measured"))
    items.append(("judges", ", ".join(judges) + " — each held out in turn; the method attacks the others"))
    items.append(("robustness", "JPEG q=75, resize ×0.5 and back, Gaussian blur σ=1" if _has_robustness(result)
                  else "not measured"))
    if cfg.get("settings"):
        items.append(("method settings", json.dumps(_jsonable(cfg["settings"]), sort_keys=True)))
    rows = "".join(f'<tr><th class="left">{_esc(k)}</th><td class="left">{_esc(v)}</td></tr>' for k, v in items)
    command = cfg.get("command") or result.get("command")
    cmd = f'<p>Command:</p><pre>{_esc(command)}</pre>' if command else ""
    thr_head = '<tr><th class="left">judge</th>' + "".join(f"<th>FAR {_far_label(f)}</th>" for f in fars) + "</tr>"
    thr_rows = "".join(
        f'<tr><td class="left">{_esc(j)}</td>'
        + "".join(f'<td>{_num(result["thresholds"].get(j, {}).get(f), ".4f")}</td>' for f in fars) + "</tr>"
        for j in judges)
    return (f'<table class="config">{rows}</table>{cmd}'
            f'<p>Cosine-similarity thresholds of the judges (a pair with similarity above the threshold is '
            f'accepted as the same person):</p><table class="results thr">{thr_head}{thr_rows}</table>')


GUIDE = """
<p><b>How to read this report.</b> A face-recognition model (the <i>judge</i>) compares a protected photo
with another, unprotected photo of the same person. <b>Dodging</b> succeeds when the judge no longer
matches them. <b>Impersonation</b> succeeds when the judge takes the protected photo for a chosen
<i>target</i> person. The <b>protection success rate (PSR)</b> is the share of photos where protection
succeeded — higher is better. Each judge is a model the method did not see (it attacks the other models),
so the numbers measure protection against an unknown recogniser. Thresholds are set so that the judge
wrongly accepts strangers at the stated false-accept rate (FAR): at FAR 1e-2 one stranger pair in a hundred
is accepted, at 1e-3 one in a thousand (a stricter system, which is easier to dodge). The
<b>unprotected floor</b> is the same test on the original photos. PSNR and SSIM compare the protected photo
with the original (higher = closer; SSIM 1 = identical), BRISQUE judges naturalness on its own
(0 best, 100 worst).</p>
"""

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d2125;
       margin: 0; background: #f6f7f9; line-height: 1.45; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 48px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e4e7eb; }
p, li { font-size: 14px; max-width: 1000px; }
.meta { color: #5b6570; font-size: 13px; margin-bottom: 14px; }
.small { font-size: 12px; color: #5b6570; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px; }
th, td { border: 1px solid #dde1e6; padding: 4px 8px; text-align: center; white-space: nowrap; }
th { background: #f0f2f5; font-weight: 600; }
th.group { background: #e6eaef; }
.left { text-align: left; }
td.strong, th.strong { font-weight: 700; }
td.na { color: #9aa3ad; }
tr.floor td { background-color: #fafafa; }
table.config th { width: 150px; vertical-align: top; }
table.config td { white-space: normal; }
table.thr td, table.thr th { min-width: 90px; }
pre { background: #f0f2f5; padding: 8px 12px; font-size: 12px; white-space: pre-wrap; word-break: break-all; }
.plots { display: flex; flex-wrap: wrap; gap: 18px 24px; align-items: flex-start; }
figure.plot { max-width: 100%; margin: 6px 0 10px; }
figure.plot figcaption { font-size: 13px; text-align: left; }
img.plot { max-width: 100%; height: auto; display: block; }
.cards { display: flex; flex-wrap: wrap; gap: 16px; }
.card { border: 1px solid #dde1e6; border-radius: 6px; padding: 10px 12px; font-size: 13px; background: #fcfcfd; }
.card-head { margin-bottom: 2px; }
.crops { display: flex; gap: 6px; margin-top: 8px; }
figure { margin: 0; text-align: center; }
figure img { display: block; image-rendering: auto; border-radius: 3px; }
figcaption { font-size: 12px; color: #5b6570; margin-top: 2px; }
.verdict { font-size: 12px; margin-top: 2px; }
.verdict.ok { color: #1a7f37; }
.verdict.bad { color: #b42318; }
details { font-size: 13px; margin-bottom: 6px; }
"""


# ------------------------------------------------------------------------------------------- page


def render_html(result: dict) -> str:
    """One self-contained HTML page for an :func:`~faceshield.eval.protocol.evaluate` result.

    No external resources: inline CSS, plots and face crops as base64 PNG ``data:`` URIs.

    Raises:
        FaceshieldError: matplotlib is not installed (``pip install 'faceshield[eval]'``), or an example's
            original and protected photos differ in size.
    """
    mpl = _require_matplotlib()
    if not result.get("judges") or not result.get("methods"):
        raise FaceshieldError("the evaluation result has no judges or no methods: nothing to report")
    fars = _far_keys(result)
    if not fars:
        raise FaceshieldError("the evaluation result has no thresholds: nothing to report")
    far = _primary_far(fars)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>faceshield evaluation report</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<h1>faceshield evaluation report</h1>",
        f'<div class="meta">generated {now} · {result.get("n_dodging", "?")} dodging pairs · judges '
        f'{_esc(", ".join(result["judges"]))} · FAR {", ".join(_far_label(f) for f in fars)}</div>',
        GUIDE,
        "<h2>Settings</h2>",
        _config_section(result),
        "<h2>1. Summary</h2>",
        "<p>Protection success rate per method; each judge column is the judge held out from the attack. "
        "Image quality is averaged over all protected photos (every judge's run).</p>",
        _summary_table(result),
    ]
    if (result.get("independent") or {}).get("thresholds"):
        parts += [
            "<h2>1b. Judged by a pipeline the protection never used</h2>",
            f"<p>Dodging PSR at FAR {_far_label(far)}, each held-out judge through the protection's own detector "
            f"and alignment (<i>same</i>) and through an independent one (<i>independent</i>: "
            f"{_esc(result['independent'].get('pipeline', ''))}), each with its own calibrated thresholds. The "
            "independent column is what a face-recognition system outside faceshield would see.</p>",
            _independent_table(result),
        ]
    if _has_robustness(result):
        parts += [
            "<h2>2. Robustness</h2>",
            f"<p>Dodging PSR at FAR {_far_label(far)} when the protected photo is re-encoded as JPEG (quality 75), "
            "halved in size and scaled back, or blurred (Gaussian σ = 1 px) before the judge sees it — what "
            "happens when a platform recompresses an upload. “as saved” is the protected photo itself.</p>",
            _robustness_table(result),
        ]
    parts += ["<h2>3. Charts</h2>", '<div class="plots">',
              _plot_figure(_plot_dodging(result, mpl), "Dodging PSR per judge (grey: unprotected photos).")]
    tradeoff = _plot_tradeoff(result, mpl)
    if tradeoff:
        parts.append(_plot_figure(tradeoff, "Stronger settings buy protection with image quality: points of one "
                                            "method (e.g. its strength presets) are joined in order of SSIM."))
    imp = _plot_impersonation(result, mpl)
    if imp:
        parts.append(_plot_figure(imp, "Impersonation PSR per target identity (dashed: unprotected photos)."))
    parts.append("</div>")
    examples = result.get("examples", [])
    if examples:
        parts += [
            "<h2>4. Before and after</h2>",
            f"<p>Face crops of a few protected photos with the judge's cosine similarity to another photo of the "
            f"same person, before → after protection. The third image is the absolute pixel difference "
            f"multiplied by {DIFF_GAIN}: it shows where the method changed the photo.</p>",
            '<div class="cards">', *(_example_card(ex, result) for ex in examples), "</div>",
        ]
    parts += ['<p class="small" style="margin-top:32px">faceshield · evaluation protocol described in '
              'METHODS.md · this page is self-contained and needs no network.</p>', "</main></body></html>"]
    return "\n".join(parts)


def markdown_tables(result: dict) -> str:
    """The report's numbers as markdown (for docs): dodging by held-out judge with the mean at the stricter FAR
    and after each degradation, impersonation by target and by judge, quality and seconds per photo. PSR in whole
    percent; "—" where not measured."""
    judges, fars = result["judges"], _far_keys(result)
    far = _primary_far(fars)
    strict = [f for f in fars if f != far][:1]

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.0f} %"

    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    def head(columns: list[str]) -> list[str]:
        return [row("method", columns), "|---" * (len(columns) + 1) + "|"]

    methods, floor = result["methods"], _floor(result, "dodging")
    out = [f"Dodging PSR at FAR {_far_label(far)} by held-out judge ({result.get('n_dodging')} pairs); the mean over "
           f"judges{''.join(f' at FAR {_far_label(f)}' for f in strict)} and after each degradation:", ""]
    out += head(judges + ["mean"] + [f"mean @{_far_label(f)}" for f in strict]
                + [f"after {label}" for label in ROBUSTNESS_LABELS.values()])
    out.append(row("unprotected (floor)", [pct(floor.get(j, {}).get(far)) for j in judges]
                   + [pct(_mean([floor.get(j, {}).get(f) for j in judges])) for f in [far] + strict]
                   + [""] * len(ROBUSTNESS_LABELS)))
    for spec, m in methods.items():
        out.append(row(spec, [pct(_dodging(m, j, far)) for j in judges]
                       + [f"**{pct(_mean([_dodging(m, j, far) for j in judges]))}**"]
                       + [pct(_mean([_dodging(m, j, f) for j in judges])) for f in strict]
                       + [pct(_mean([_robust(m, j, kind, far) for j in judges])) for kind in ROBUSTNESS_LABELS]))

    targets = result.get("targets") or []
    if _has_impersonation(result):
        out += ["", f"Impersonation PSR at FAR {_far_label(far)} ({result.get('n_impersonation_per_target')} sources "
                "per target), mean over held-out judges, by target; then by judge, mean over targets:", ""]
        out += head([_target_label(t) for t in targets] + judges + ["mean"])
        imp_floor = _floor(result, "impersonation")
        if imp_floor:
            out.append(row("unprotected (floor)", [""] * len(targets)
                           + [pct(imp_floor.get(j, {}).get(far)) for j in judges]
                           + [pct(_mean([imp_floor.get(j, {}).get(far) for j in judges]))]))
        for spec, m in methods.items():
            by_judge = [_mean([_impersonation(m, [j], t, far) for t in targets]) for j in judges]
            out.append(row(spec, [pct(_impersonation(m, judges, t, far)) for t in targets]
                           + [pct(x) for x in by_judge] + [f"**{pct(_mean(by_judge))}**"]))

    ind_judges = [j for j in judges if j in ((result.get("independent") or {}).get("thresholds") or {})]
    if ind_judges:
        ind_floor = (result.get("floor") or {}).get("independent") or {}

        def ind(entry: dict | None) -> float | None:
            return (entry or {}).get("dodging", {}).get(far)

        out += ["", f"Dodging PSR at FAR {_far_label(far)} through the independent judging pipeline "
                f"({result['independent']['pipeline']}), by held-out judge:", ""]
        out += head(ind_judges + ["mean", "no face found"])
        out.append(row("unprotected (floor)", [pct(ind(ind_floor.get(j))) for j in ind_judges]
                       + [pct(_mean([ind(ind_floor.get(j)) for j in ind_judges])), ""]))
        for spec, m in methods.items():
            entries = [m["judges"].get(j, {}).get("independent") for j in ind_judges]
            out.append(row(spec, [pct(ind(e)) for e in entries] + [f"**{pct(_mean([ind(e) for e in entries]))}**",
                                                                    str(sum((e or {}).get("no_face", 0)
                                                                            for e in entries))]))

    out += ["", "Quality of the whole protected photo (mean, minimum in brackets; BRISQUE: lower is better) and "
            "seconds per photo:", ""]
    out += head(["PSNR dB", "SSIM", "BRISQUE", "s per photo"])
    for spec, m in methods.items():
        q, lo = m.get("quality", {}), m.get("quality_min", {})
        out.append(row(spec, [f"{_num(q.get('psnr'), '.1f')} ({_num(lo.get('psnr'), '.1f')})",
                              f"{_num(q.get('ssim'), '.3f')} ({_num(lo.get('ssim'), '.3f')})",
                              _num(q.get("brisque"), ".1f"), _num(q.get("seconds"), ".1f")]))
    return "\n".join(out) + "\n"


def write_report(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` to ``out_dir`` (created if needed), each atomically.

    The JSON is written first, so an evaluation's numbers are kept even if the HTML cannot be drawn.

    Returns:
        (json path, html path).
    """
    out_dir = Path(out_dir)
    json_path = write_text_atomic(out_dir / "report.json", to_json(result))
    html_path = write_text_atomic(out_dir / "report.html", render_html(result))
    log.info("wrote %s and %s", json_path, html_path)
    return json_path, html_path
