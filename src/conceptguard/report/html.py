"""One self-contained HTML report from evaluation and attack run folders.

A run folder holds ``results.json`` (written by ``conceptguard eval``) with its ``images/``, and/or
``attack.json`` (written by attacks). ``attack.json`` is one attack object, a list of them, or
``{"attacks": [...]}``; an attack object is::

    {"kind": "relearn",                 # attack name (required)
     "concept": "halo",                 # the erased concept it tries to bring back (optional)
     "metric": "detection",             # key of the curve's values (optional, default "detection")
     "config": {...},                   # settings shown in the report (optional)
     "chart": "lora attack on zorblat", # groups curves into one chart per title (optional)
     "label": "esd-x",                  # the curve's legend (optional, default "run / kind / concept")
     "curve": [{"step": 0, "detection": 0.05}, {"step": 50, "detection": 0.4}, ...]}

The report shows, in one HTML file with every image embedded as base64 PNG: bar charts of the
metrics, image grids (one per erased concept and prompt group: a row per model, the same prompts
and seeds in the same column), recovery curves of the attacks and the configs used. The charts
are also written as PNG files next to the HTML.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptguard.errors import ConceptGuardError
from conceptguard.report import plots

RESULTS_FILE = "results.json"
ATTACK_FILE = "attack.json"
GRID_COLUMNS = 8
TILE = 96  # pixels per image in the grids (the world's 64x64 images are scaled up, nearest-neighbour)
GROUP_ORDER = ("target", "paraphrase", "implicit", "preservation")
PRESERVATION_KEYS = ("shape", "colour", "style", "seen_character", "held_out_character", "accuracy")


@dataclass
class Run:
    name: str
    path: Path
    results: dict | None = None
    attacks: list[dict] = field(default_factory=list)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConceptGuardError(f"cannot read {path}: {exc}") from exc


def parse_attacks(data: object, source: Path) -> list[dict]:
    """Validate ``attack.json`` content (see the module docstring) into a list of attack objects."""
    if isinstance(data, dict) and "attacks" in data:
        data = data["attacks"]
    items = data if isinstance(data, list) else [data]
    attacks = []
    for k, item in enumerate(items):
        where = f"{source} (attack {k})"
        if not isinstance(item, dict) or not isinstance(item.get("kind"), str):
            raise ConceptGuardError(f"{where}: an attack needs a string 'kind'")
        metric = item.get("metric", "detection")
        curve = item.get("curve")
        if not isinstance(curve, list) or not curve:
            raise ConceptGuardError(f"{where}: 'curve' must be a non-empty list of {{'step': .., '{metric}': ..}}")
        points = []
        for point in curve:
            try:
                points.append((float(point["step"]), float(point[metric])))
            except (TypeError, KeyError, ValueError):
                raise ConceptGuardError(f"{where}: every curve point needs numeric 'step' and '{metric}'") from None
        attacks.append({**item, "metric": metric, "points": sorted(points)})
    return attacks


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ConceptGuardError(f"run folder not found: {path}")
    results_path, attack_path = path / RESULTS_FILE, path / ATTACK_FILE
    if not results_path.is_file() and not attack_path.is_file():
        raise ConceptGuardError(f"{path} holds neither {RESULTS_FILE} nor {ATTACK_FILE}")
    run = Run(name or path.resolve().name, path)
    if results_path.is_file():
        results = _read_json(results_path)
        if not isinstance(results, dict) or results.get("format") != "conceptguard-eval":
            raise ConceptGuardError(f"{results_path} is not a conceptguard evaluation result")
        run.results = results
    if attack_path.is_file():
        run.attacks = parse_attacks(_read_json(attack_path), attack_path)
    return run


def _unique_names(paths: list[Path]) -> list[str]:
    names, seen = [], {}
    for path in paths:
        base = path.resolve().name or "run"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


# --------------------------------------------------------------------------------------------
# Series: which numbers each chart compares
# --------------------------------------------------------------------------------------------

def model_series(runs: list[Run]) -> list[tuple[str, dict]]:
    """(label, metrics) per model: the base model once (from the first run that has one), then each run."""
    series = []
    base_seen: set[str] = set()
    for run in runs:
        if run.results is None:
            continue
        metrics = run.results["metrics"]
        base_config = run.results["config"].get("base") or {}
        key = base_config.get("content_hash", run.name)
        if "base" in metrics and key not in base_seen:
            base_seen.add(key)
            series.append(("base" if len(base_seen) == 1 else f"base-{len(base_seen)}", metrics["base"]))
    for run in runs:
        if run.results is not None:
            series.append((run.name, run.results["metrics"]["model"]))
    return series


def _detection_categories(series: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for _, metrics in series:
        for group, entry in metrics.get("groups", {}).items():
            for concept in entry.get("detection", {}):
                if (concept, group) not in pairs:
                    pairs.append((concept, group))
    order = {g: k for k, g in enumerate(GROUP_ORDER)}
    return sorted(pairs, key=lambda p: (p[0], order.get(p[1], len(order)), p[1]))


def build_charts(runs: list[Run]) -> dict[str, tuple[str, bytes]]:
    """name -> (caption, PNG bytes) of every chart the runs have data for."""
    charts: dict[str, tuple[str, bytes]] = {}
    series = model_series(runs)
    categories = _detection_categories(series)
    if categories:
        values = {label: [m.get("groups", {}).get(g, {}).get("detection", {}).get(c) for c, g in categories]
                  for label, m in series}
        charts["detection"] = ("Share of images in which the detector finds each erased concept (lower = "
                               "better erased on target/paraphrase/implicit prompts)",
                               plots.grouped_bars("Erased-concept detection rate", [f"{c}\n{g}" for c, g in categories],
                                                  values, ylabel="detected", percent=True))
    with_preservation = [(label, m["preservation"]) for label, m in series if m.get("preservation")]
    if with_preservation:
        charts["preservation"] = ("Detector agreement with the prompted labels on preservation prompts (higher = "
                                  "better kept; held_out_character is a leak rate, lower is better)",
                                  plots.grouped_bars("Preservation", [k.replace("_", "\n") for k in PRESERVATION_KEYS],
                                                     {label: [p.get(k) for k in PRESERVATION_KEYS]
                                                      for label, p in with_preservation},
                                                     ylabel="agreement", percent=True))
    panels: dict[str, dict[str, float | None]] = {}
    for label, m in series:
        clip = [e["clip_score"] for e in m.get("groups", {}).values() if e.get("clip_score") is not None]
        if clip:
            panels.setdefault("CLIP score (mean)", {})[label] = float(np.mean(clip))
        if m.get("fid"):
            panels.setdefault("FID", {})[label] = m["fid"]["value"]
    for run in runs:
        lpips = ((run.results or {}).get("metrics", {}).get("comparison") or {}).get("lpips")
        if lpips:
            panels.setdefault("LPIPS-like vs base", {})[run.name] = lpips.get("all")
    if panels:
        charts["quality"] = ("Image quality: CLIP score (higher = closer to the prompt), FID against the reference "
                             "images and LPIPS-like distance to the base model's images (lower = closer)",
                             plots.metric_panels("Quality", panels))
    # Attacks name their chart with an optional "chart" key (one chart per attack kind, say) and their
    # line with "label"; without them every curve goes into the one "recovery" chart.
    by_chart: dict[str, dict[str, list]] = {}
    for run in runs:
        for attack in run.attacks:
            label = attack.get("label") or " / ".join(x for x in (run.name, attack["kind"], attack.get("concept")) if x)
            by_chart.setdefault(attack.get("chart") or "", {})[label] = attack["points"]
    metric = runs[0].attacks[0]["metric"] if runs and runs[0].attacks else "detection"
    for title, curves in by_chart.items():
        key = "recovery" if not title else "recovery-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        charts[key] = ("Recovery of the erased concept under attack: detection rate per attack step",
                       plots.recovery_curves(title or "Recovery curves", curves, ylabel=metric))
    return charts


# --------------------------------------------------------------------------------------------
# Image grids
# --------------------------------------------------------------------------------------------

def _image_index(run: Run, which: str) -> dict[tuple[str, int], Path]:
    """(prompt, seed) -> image path of a run's model ("model") or base ("base") images."""
    index = {}
    for record in run.results["images"]:
        entry = record if which == "model" else record.get("base")
        if entry:
            index[(record["prompt"], record["seed"])] = run.path / entry["file"]
    return index


def _tile(path: Path | None):
    from PIL import Image

    if path is None or not path.is_file():
        return Image.new("RGB", (TILE, TILE), (200, 200, 200))  # missing image: flat grey
    image = Image.open(path).convert("RGB")
    resample = Image.NEAREST if image.width < TILE else Image.BICUBIC
    return image.resize((TILE, TILE), resample)


def _strip(paths: list[Path | None]) -> bytes:
    from PIL import Image

    gap = 4
    strip = Image.new("RGB", (len(paths) * (TILE + gap) - gap, TILE), (255, 255, 255))
    for k, path in enumerate(paths):
        strip.paste(_tile(path), (k * (TILE + gap), 0))
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    return buffer.getvalue()


def build_grids(runs: list[Run], columns: int = GRID_COLUMNS) -> list[dict]:
    """Grids of (concept, group): columns = the first run's first prompts of that group, rows = models."""
    evaluated = [r for r in runs if r.results is not None]
    if not evaluated:
        return []
    rows: list[tuple[str, dict]] = []
    base_run = next((r for r in evaluated if any("base" in rec for rec in r.results["images"])), None)
    if base_run is not None:
        rows.append(("base", _image_index(base_run, "base")))
    rows += [(r.name, _image_index(r, "model")) for r in evaluated]
    first = evaluated[0].results["images"]
    sections: dict[tuple[str, str], list[dict]] = {}
    for record in first:
        key = (record.get("concept") or "", record["group"])
        sections.setdefault(key, []).append(record)
    order = {g: k for k, g in enumerate(GROUP_ORDER)}
    grids = []
    for (concept, group), records in sorted(sections.items(), key=lambda s: (s[0][0] == "", s[0][0],
                                                                             order.get(s[0][1], 99), s[0][1])):
        chosen = records[:columns]
        keys = [(r["prompt"], r["seed"]) for r in chosen]
        grids.append({
            "title": f"{concept}: {group} prompts" if concept else f"{group} prompts",
            "columns": [{"prompt": r["prompt"], "seed": r["seed"]} for r in chosen],
            "rows": [(label, _strip([index.get(k) for k in keys])) for label, index in rows],
        })
    return grids


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 14px; margin: 16px 0 6px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure.chart { display: inline-table; vertical-align: top; margin: 8px 12px 16px 0; } .chart img { max-width: 100%; border: 1px solid #eee; }
figure.chart figcaption { display: table-caption; caption-side: bottom; }
.caption { font-size: 12px; color: #555; }
table.grid td { padding: 2px 8px 2px 0; vertical-align: middle; font-size: 12px; }
table.grid img { image-rendering: pixelated; display: block; }
ol.prompts { font-size: 11px; color: #555; columns: 2; margin: 4px 0 0; }
table.metrics { border-collapse: collapse; font-size: 12px; }
table.metrics td, table.metrics th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 8px; font-size: 11px; overflow-x: auto; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if percent else f"{value:.4g}"


def _summary_table(runs: list[Run]) -> str:
    series = model_series(runs)
    if not series:
        return ""
    categories = _detection_categories(series)
    head = ["model"] + [f"{c} {g}" for c, g in categories] + ["preservation", "FID", "CLIP"]
    lines = ["<table class='metrics'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for label, m in series:
        groups = m.get("groups", {})
        cells = [label] + [_fmt(groups.get(g, {}).get("detection", {}).get(c), True) for c, g in categories]
        cells.append(_fmt((m.get("preservation") or {}).get("accuracy"), True))
        cells.append(_fmt((m.get("fid") or {}).get("value")))
        clip = [e["clip_score"] for e in groups.values() if e.get("clip_score") is not None]
        cells.append(_fmt(float(np.mean(clip)) if clip else None))
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return "\n".join(lines) + "</table>"


def render_html(runs: list[Run], charts: dict[str, tuple[str, bytes]], grids: list[dict]) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>conceptguard report</title>",
             f"<style>{STYLE}</style></head><body>",
             "<h1>conceptguard report</h1>",
             "<p class='caption'>Runs: " + ", ".join(html.escape(r.name) for r in runs) + "</p>"]
    metric_charts = [k for k in ("detection", "preservation", "quality") if k in charts]
    if metric_charts:
        parts.append("<h2>Metrics</h2>")
        parts.append(_summary_table(runs))
        parts.append("<div class='charts'>")
        for key in metric_charts:
            caption, png = charts[key]
            parts.append(f"<figure class='chart'><img alt='{key}' src='{_data_uri(png)}'>"
                         f"<figcaption class='caption'>{html.escape(caption)}</figcaption></figure>")
        parts.append("</div>")
    if grids:
        parts.append("<h2>Images</h2><p class='caption'>Each column is one prompt and seed; each row one model.</p>")
        for grid in grids:
            parts.append(f"<h3>{html.escape(grid['title'])}</h3><table class='grid'>")
            for label, png in grid["rows"]:
                parts.append(f"<tr><td>{html.escape(label)}</td><td><img alt='{html.escape(label)}' "
                             f"src='{_data_uri(png)}'></td></tr>")
            parts.append("</table><ol class='prompts'>" + "".join(
                f"<li>{html.escape(c['prompt'])} <span>(seed {c['seed']})</span></li>" for c in grid["columns"])
                + "</ol>")
    recovery = [key for key in charts if key.startswith("recovery")]
    if recovery:
        parts.append("<h2>Attacks</h2>")
        for key in recovery:
            caption, png = charts[key]
            parts.append(f"<figure class='chart'><img alt='{key}' src='{_data_uri(png)}'>"
                         f"<figcaption class='caption'>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Configurations</h2>")
    for run in runs:
        config = {}
        if run.results is not None:
            config = {"config": run.results.get("config"), "versions": run.results.get("versions"),
                      "scorers": run.results.get("scorers")}
        if run.attacks:
            config["attacks"] = [{k: v for k, v in a.items() if k not in ("curve", "points")} for a in run.attacks]
        parts.append(f"<details><summary>{html.escape(run.name)}</summary>"
                     f"<pre>{html.escape(json.dumps(config, indent=2))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(run_dirs: list[str | Path], out_html: str | Path) -> dict[str, Path]:
    """Write ``out_html`` and one PNG per chart next to it (``<stem>-<chart>.png``); returns the paths."""
    from conceptguard.outputs import atomic_write_bytes, atomic_write_text

    if not run_dirs:
        raise ConceptGuardError("no run folders given")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, name) for p, name in zip(paths, _unique_names(paths))]
    out_html = Path(out_html)
    if out_html.suffix.lower() not in (".html", ".htm"):
        raise ConceptGuardError(f"the report must be an .html file, got {out_html}")
    charts = build_charts(runs)
    grids = build_grids(runs)
    written = {}
    for key, (_, png) in charts.items():
        written[key] = atomic_write_bytes(out_html.with_name(f"{out_html.stem}-{key}.png"), png)
    written["html"] = atomic_write_text(out_html, render_html(runs, charts, grids))
    return written
