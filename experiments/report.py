"""``docs/reproduction.md`` and its figures, written from the grid cells' JSON only (never by hand).

The hand-written reading of the numbers, if any, lives in ``experiments/reading.md`` and is copied in verbatim.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.grid import Grid, code_version, finite, stale_cells

READING = Path(__file__).resolve().parent / "reading.md"
COLUMNS = ("masked", "unmasked", "tuned")
COLUMN_TITLES = {"masked": "masked inference", "unmasked": "unmasked inference", "tuned": "after tuning"}
METRICS = {"zeroshot_top1": "zero-shot top-1", "retrieval_r1": "retrieval R@1 (image to text)"}
# The paper's ImageNet zero-shot top-1 (official README; CC12M, ViT-B/16), columns as COLUMNS; None: not reported.
PAPER = {
    ("CLIP", 0.0): (None, 36.5, None),
    ("FLIP", 0.5): (33.9, 36.1, 36.2),
    ("GLIP", 0.5): (35.4, 37.1, 37.2),
    ("FLIP", 0.75): (28.2, 32.0, 32.6),
    ("GLIP", 0.75): (30.8, 33.9, 34.0),
    ("FLIP", 0.918): (17.9, 23.5, 24.5),
    ("GLIP", 0.918): (22.1, 18.6, 28.0),
}
COLOURS = {"CLIP": "black", "FLIP": "tab:blue", "GLIP": "tab:red"}


@dataclass
class Arm:
    """One row: an arm's cells over seeds."""

    name: str
    cells: list[dict[str, Any]] = field(default_factory=list)

    def first(self, key: str) -> Any:
        return self.cells[0][key]

    def values(self, column: str, metric: str) -> list[float]:
        return [c["eval"][column][metric] for c in self.cells if c["eval"].get(column)]

    def stat(self, key: str) -> list[float]:
        return [c[key] for c in self.cells]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (``n`` seeds when fewer than the others are in); ``–`` when there is nothing."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def load_results(cells_dir: Path) -> list[dict[str, Any]]:
    """The complete cell results in ``cells_dir`` (sorted by name)."""
    results = []
    for path in sorted(Path(cells_dir).glob("*.json")):
        result = json.loads(path.read_text())
        if result.get("complete"):
            results.append(result)
    return results


def group_arms(results: list[dict[str, Any]], grid: Grid) -> dict[str, Arm]:
    """Arms in the grid's order (arms no longer in the grid last), each with its cells sorted by seed."""
    arms: dict[str, Arm] = {}
    order = {name: index for index, name in enumerate(grid.arms)}
    for result in sorted(results, key=lambda r: (order.get(r["arm"], len(order)), r["arm"], r["seed"])):
        arms.setdefault(result["arm"], Arm(result["arm"])).cells.append(result)
    return arms


def label(arm: Arm) -> str:
    ratio = arm.first("mask_ratio")
    text = arm.first("method") if ratio == 0 else f"{arm.first('method')} {ratio * 100:g}%"
    if arm.first("mask_sigma") not in (None, 0.2):
        text += f" σ={arm.first('mask_sigma')}"
    return text


# -------------------------------------------------------------------------------------------------------- tables


def accuracy_table(arms: list[Arm], metric: str, with_paper: bool) -> list[str]:
    head = "| method | mask ratio | σ | seeds | " + " | ".join(COLUMN_TITLES[c] for c in COLUMNS)
    head += " | paper (masked / unmasked / tuned) |" if with_paper else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm in arms:
        method, ratio = arm.first("method"), arm.first("mask_ratio")
        sigma = arm.first("mask_sigma")
        row = f"| {method} | {ratio * 100:g}% | {sigma if sigma is not None else '–'} | {len(arm.cells)} | "
        row += " | ".join(fmt(arm.values(c, metric)) for c in COLUMNS)
        if with_paper:
            paper = PAPER.get((method, ratio)) if sigma in (None, 0.2) else None
            row += " | " + (" / ".join("–" if v is None else f"{v}" for v in paper) if paper else "–")
        lines.append(row + " |")
    return lines


def compute_table(arms: list[Arm]) -> list[str]:
    head = (
        "| arm | budget | masked-stage steps | images seen | counted GFLOPs / step | counted TFLOPs (masked stage) "
        "| train time (s) | images/s | images/s per seed | tuning time (s) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm in arms:
        lines.append(
            f"| {arm.name} | {arm.first('budget').replace('_', ' ')} | {arm.first('steps')} | "
            f"{arm.first('images_seen')} | {arm.first('flops_per_step') / 1e9:.2f} | "
            f"{arm.first('train_flops') / 1e12:.2f} | {fmt(arm.stat('train_seconds'), 1, 0)} | "
            f"{fmt(arm.stat('images_per_s'), 1, 0)} | {' / '.join(f'{v:.0f}' for v in arm.stat('images_per_s'))} | "
            f"{fmt(arm.stat('tuning_seconds'), 1, 0)} |"
        )
    return lines


def compare(a: Arm | None, b: Arm | None, column: str, metric: str = "zeroshot_top1") -> tuple[str, str]:
    """``(difference a - b in points ± its standard error, verdict)`` over seeds."""
    if a is None or b is None:
        return "–", "not run"
    va, vb = a.values(column, metric), b.values(column, metric)
    if not va or not vb:
        return "–", "not measured"
    (ma, sa), (mb, sb) = mean_std(va), mean_std(vb)
    diff = (ma - mb) * 100
    if len(va) < 2 or len(vb) < 2:
        return f"{diff:+.1f}", "one seed: no spread"
    se = math.sqrt(sa**2 / len(va) + sb**2 / len(vb)) * 100
    verdict = "holds" if diff > 2 * se else ("reversed" if diff < -2 * se else "within seed noise (< 2 s.e.)")
    return f"{diff:+.1f} ± {se:.1f}", verdict


def _paper_diff(first: tuple, second: tuple, column: str) -> str:
    index = COLUMNS.index(column)
    if first is None or second is None or first[index] is None or second[index] is None:
        return "–"
    return f"{first[index] - second[index]:+.1f}"


def orderings_table(arms: dict[str, Arm]) -> list[str]:
    """The paper's orderings, each as a difference in zero-shot top-1 points (± standard error over seeds)."""
    rows = []
    for ratio, tag in ((0.5, "50"), (0.75, "75"), (0.918, "92")):
        glip, flip = arms.get(f"glip-{tag}"), arms.get(f"flip-{tag}")
        for column in COLUMNS:
            paper = _paper_diff(PAPER[("GLIP", ratio)], PAPER[("FLIP", ratio)], column)
            rows.append(
                (f"GLIP − FLIP at {ratio * 100:g}%, {COLUMN_TITLES[column]}", paper, *compare(glip, flip, column))
            )
    ratios = {"50": 0.5, "75": 0.75, "92": 0.918}
    within = (
        ("tuned", "unmasked", "unmasked-tuning gain", 2, 1),
        ("unmasked", "masked", "masked-inference loss", 1, 0),
    )
    for high, low, what, hi, lo in within:
        for tag, ratio in ratios.items():
            for method in ("FLIP", "GLIP"):
                paper = PAPER[(method, ratio)]
                rows.append(
                    (
                        f"{what}, {method} {tag}% ({COLUMN_TITLES[high]} − {COLUMN_TITLES[low]})",
                        f"{paper[hi] - paper[lo]:+.1f}",
                        *_within(arms.get(f"{method.lower()}-{tag}"), high, low),
                    )
                )
    for column in ("unmasked", "tuned"):
        rows.append(
            (
                f"centre-agnostic data: GLIP − FLIP at 75%, {COLUMN_TITLES[column]}",
                "> 0 (claimed)",
                *compare(arms.get("glip-75-uniform"), arms.get("flip-75-uniform"), column),
            )
        )
    for name in ("flip-75-compute", "flip-92-compute", "glip-75-compute", "glip-92-compute"):
        arm, clip = arms.get(name), arms.get("clip")
        what = f"equal counted FLOPs: {name.replace('-compute', '')} − CLIP"
        rows.append((f"{what}, unmasked inference", "> 0 (FLIP's claim)", *compare(arm, clip, "unmasked")))
        rows.append((f"{what}, after tuning (CLIP as trained)", "> 0 (FLIP's claim)", *_vs_clip(arm, clip)))
    lines = ["| ordering | paper (points) | miniature (points, ± s.e.) | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return lines


def _vs_clip(arm: Arm | None, clip: Arm | None) -> tuple[str, str]:
    """A masked arm after tuning against CLIP (which has no tuning stage: its unmasked column)."""
    if arm is None or clip is None:
        return "–", "not run"
    proxy = Arm("clip", [{**c, "eval": {**c["eval"], "tuned": c["eval"]["unmasked"]}} for c in clip.cells])
    return compare(arm, proxy, "tuned")


def _within(arm: Arm | None, high: str, low: str) -> tuple[str, str]:
    """Mean over seeds of the per-seed difference ``high - low`` (paired), ± its standard error."""
    if arm is None:
        return "–", "not run"
    pairs = [
        c["eval"][high]["zeroshot_top1"] - c["eval"][low]["zeroshot_top1"]
        for c in arm.cells
        if c["eval"].get(high) and c["eval"].get(low)
    ]
    if not pairs:
        return "–", "not measured"
    mean, std = mean_std(pairs)
    if len(pairs) < 2:
        return f"{mean * 100:+.1f}", "one seed: no spread"
    se = std / math.sqrt(len(pairs)) * 100
    verdict = "positive" if mean * 100 > 2 * se else ("negative" if mean * 100 < -2 * se else "within seed noise")
    return f"{mean * 100:+.1f} ± {se:.1f}", verdict


# ------------------------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_ratio(arms: dict[str, Arm], out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"unmasked": ("-", "o"), "masked": ("--", "x"), "tuned": (":", "^")}
    for ax, metric in zip(axes, METRICS):
        clip = arms.get("clip")
        if clip:
            mean, std = mean_std(clip.values("unmasked", metric))
            ax.errorbar([0], [mean * 100], [std * 100], color="black", marker="s", capsize=3, label="CLIP")
            ax.axhline(mean * 100, color="black", lw=0.6, ls="-.")
        for method in ("FLIP", "GLIP"):
            main = [a for a in arms.values() if a.first("method") == method and a.first("group") == "main"]
            for column, (ls, marker) in styles.items():
                points = [(a.first("mask_ratio"), *mean_std(a.values(column, metric))) for a in main]
                points = sorted(p for p in points if not math.isnan(p[1]))
                if points:
                    ax.errorbar(
                        [p[0] * 100 for p in points],
                        [p[1] * 100 for p in points],
                        [p[2] * 100 for p in points],
                        color=COLOURS[method],
                        ls=ls,
                        marker=marker,
                        capsize=3,
                        label=f"{method}, {COLUMN_TITLES[column]}",
                    )
        ax.set_xlabel("mask ratio (%)")
        ax.set_ylabel(f"{METRICS[metric]} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Held-out accuracy vs mask ratio (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _final(arm: Arm) -> list[float]:
    column = "tuned" if arm.values("tuned", "zeroshot_top1") else "unmasked"
    return arm.values(column, "zeroshot_top1")


def plot_accuracy_vs_cost(arms: dict[str, Arm], out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm in arms.values():
        mean, std = mean_std(_final(arm))
        seconds = [c["train_seconds"] + c["tuning_seconds"] for c in arm.cells]
        flops = [c["train_flops"] + c["tuning_flops"] for c in arm.cells]
        marker = (
            "s" if arm.first("budget") == "same_compute" else ("D" if arm.first("placement") == "uniform" else "o")
        )
        for ax, x in ((axes[0], seconds), (axes[1], [f / 1e12 for f in flops])):
            xm, xs = mean_std(x)
            ax.errorbar(xm, mean * 100, std * 100, xs, color=COLOURS[arm.first("method")], marker=marker, capsize=2)
            ax.annotate(arm.name, (xm, mean * 100), fontsize=6, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("training time, masked stage + tuning (s, one CPU thread, shared machine)")
    axes[1].set_xlabel("counted training TFLOPs (masked stage + tuning)")
    for ax in axes:
        ax.set_ylabel("zero-shot top-1 (%), after tuning (CLIP: as trained)")
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy vs training cost (o same steps, s same compute, D centre-agnostic data)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _mean_curve(arm: Arm) -> tuple[list[int], list[float]]:
    by_step = defaultdict(list)
    for cell in arm.cells:
        for step, loss in cell["loss_curve"]:
            if loss is not None:  # a logging window whose every step was skipped has no loss
                by_step[step].append(loss)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def _line_style(arm: Arm) -> dict[str, Any]:
    """Colour by method, dash by mask ratio; the sigma and centre-agnostic arms faint, same-compute arms thick."""
    dashes = {0.0: "-", 0.5: "-", 0.75: "--", 0.918: ":"}
    faint = arm.first("group") in ("sigma", "centre_agnostic")
    return {
        "color": COLOURS[arm.first("method")],
        "ls": dashes.get(arm.first("mask_ratio"), "-."),
        "alpha": 0.45 if faint else 1.0,
        "lw": 2.2 if arm.first("budget") == "same_compute" else 1.0,
        "label": arm.name,
    }


def plot_loss_curves(arms: dict[str, Arm], out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms.values():
        steps, losses = _mean_curve(arm)
        style = _line_style(arm)
        if arm.first("budget") != "same_compute":
            axes[0].plot(steps, losses, **style)
        if arm.first("group") in ("main", "same_compute"):
            masked = [(s, v) for s, v in zip(steps, losses) if s <= arm.first("steps")]
            flops = [s * arm.first("flops_per_step") / 1e12 for s, _ in masked]
            axes[1].plot(flops, [v for _, v in masked], **style)
    axes[0].set_xlabel("optimizer step (same-steps arms; the tuning stage follows the last masked step)")
    axes[1].set_xlabel("counted TFLOPs of the masked stage (thick: same-compute arms)")
    for ax in axes:
        ax.set_ylabel("training loss (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Loss curves (solid 0-50%, dashed 75%, dotted 91.8%)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_masks(grid: Grid, out: Path) -> Path:
    """The mask picture at the grid's own image and patch size (``glip_hf.masking``'s renderer)."""
    import torch

    from glip_hf.masking import render_mask_figure
    from glip_hf.synthetic import render_example_scene

    size, patch = int(grid.base["image_size"]), int(grid.base["patch_size"])
    pil = render_example_scene(size)
    image = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return render_mask_figure(image.permute(2, 0, 1).float() / 255.0, out, patch, 0.75, (0.1, 0.2, 0.8), 2048, 0)


# -------------------------------------------------------------------------------------------------------- report


def write_report(cells_dir: Path, report: Path, grid: Grid, quick: bool = False) -> Path:
    """Write ``report`` (markdown) and its figures beside the cells' folder from the JSON in ``cells_dir``."""
    results = load_results(cells_dir)
    if not results:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text("# Reproduction\n\nNo finished cell yet: run `python experiments/reproduce.py`.\n")
        return report
    bad = [r["cell"] for r in results if not finite(r)]
    if bad:
        raise ValueError(f"cells {bad} hold non-finite numbers; delete their JSON and rerun them.")
    folder = Path(cells_dir).parent
    arms = group_arms(results, grid)
    figures = {
        "accuracy_vs_ratio.png": plot_accuracy_vs_ratio(arms, folder / "accuracy_vs_ratio.png"),
        "accuracy_vs_cost.png": plot_accuracy_vs_cost(arms, folder / "accuracy_vs_cost.png"),
        "loss_curves.png": plot_loss_curves(arms, folder / "loss_curves.png"),
        "masks.png": plot_masks(grid, folder / "masks.png"),
    }
    rel = {name: path.relative_to(report.parent).as_posix() for name, path in figures.items()}
    text = render(arms, grid, results, rel, quick)
    report.write_text(text)
    return report


def _missing(grid: Grid, results: list[dict[str, Any]]) -> list[str]:
    done = {r["cell"] for r in results}
    return [cell.name for cell in grid.cells() if cell.name not in done]


def _data_line(result: dict[str, Any], base: dict[str, Any]) -> str:
    if result["dataset"] != "builtin":
        return f"- Data: `{result['dataset']}` (given to the grid), zero-shot and retrieval on its held-out split."
    return (
        f"- Data: the built-in generated scenes, {base.get('synthetic_num_train')} training / "
        f"{base.get('synthetic_num_test')} held-out images, 36 zero-shot classes (colour x shape, chance 2.8%); "
        "objects centre-biased unless the arm says `synthetic_placement: uniform`."
    )


def _code_line(results: list[dict[str, Any]]) -> str:
    """Which code computed the cells, and whether it is the code beside the report (`code_version`)."""
    current = code_version()
    commits = Counter((r.get("code") or {}).get("commit") for r in results)
    line = "Code that computed the cells: " + ", ".join(
        f"{f'commit {c}' if c else 'not recorded'} ({n} cells)" for c, n in sorted(commits.items(), key=str)
    )
    stale = stale_cells(results, current)
    if not stale:
        return line + "; the sources beside this report when it was written."
    return line + (
        f". {len(stale)} of {len(results)} cells were not computed by the sources beside this report when it was "
        "written: their figures are the other code's, and this code may give others; delete their JSON and rerun the "
        "grid to recompute them."
    )


def render(arms: dict[str, Arm], grid: Grid, results: list[dict], figures: dict[str, str], quick: bool) -> str:
    by_group = defaultdict(list)
    for arm in arms.values():
        by_group[arm.first("group")].append(arm)
    machines = sorted({r["machine"] for r in results})
    command = "python experiments/reproduce.py" + (" --quick" if quick else "")
    base = grid.base
    out = [
        "# Reproducing GLIP in miniature",
        "",
        f"Written by `{command}` from the cells' JSON in `{Path(figures['masks.png']).parent.as_posix()}/cells/` "
        "(one file per cell, committed); do not edit by hand, rerun `python experiments/reproduce.py --report_only`.",
        f"Machine: {'; '.join(machines)} (cells ran side by side on a machine shared with other jobs: times are "
        "indicative, counted FLOPs are exact).",
        _code_line(results),
        "",
        "## Setup",
        "",
        _data_line(results[0], base),
        f"- Model: ViT {base['image_size']} px / patch {base['patch_size']} "
        f"({(base['image_size'] // base['patch_size']) ** 2} patches), width {base['vision_hidden_size']}, "
        f"{base['vision_layers']} layers; text width {base['text_hidden_size']}, {base['text_layers']} layers.",
        f"- Training: {base['max_steps']} masked-stage steps at batch {base['per_device_train_batch_size']}, "
        f"lr {base['learning_rate']} (cosine, {base['warmup_steps']} warmup), then "
        f"{base['unmasked_tuning_steps']} unmasked-tuning steps at lr {base['unmasked_tuning_learning_rate']} "
        "(the training's own `--unmasked_tuning_steps` stage; CLIP has none). Seeds: "
        f"{', '.join(map(str, grid.seeds))}.",
        "- Evaluation (`glip_hf.evaluation`, held-out split): zero-shot top-1 and image-to-text retrieval R@1; "
        f"masked inference = the arm's own ratio and strategy, mean of {grid.eval.mask_draws} mask draws; "
        "masked and unmasked inference use the model at the end of the masked stage, *after tuning* the final model.",
        "- Same compute: each `*-compute` arm trains its masked stage for the steps that spend the counted FLOPs "
        f"(torch `FlopCounterMode`, forward + backward of one step) of `{grid.reference}`'s masked stage, so it sees "
        "more images. Counted FLOPs were chosen over wall-clock because they are deterministic and this machine "
        "is shared.",
        "",
    ]
    missing = _missing(grid, results)
    if missing:
        out += [f"**Missing cells ({len(missing)}):** {', '.join(missing)}.", ""]
    out += ["## Zero-shot top-1 (%), mean ± std over seeds", ""]
    out += accuracy_table(by_group["main"] + by_group["sigma"], "zeroshot_top1", with_paper=True) + [""]
    out += ["## Retrieval R@1, image to text (%)", ""]
    out += accuracy_table(by_group["main"] + by_group["sigma"], "retrieval_r1", with_paper=False) + [""]
    if results[0]["dataset"] == "builtin":
        out += [
            "The built-in captions repeat across images of the same colour, shape and size (about 8 such images per "
            "description in 600), so retrieval R@1 is bounded well below 100% and ties are broken by row order: read "
            "it for its ordering only.",
            "",
        ]
    for group, title in (
        ("centre_agnostic", "Centre-agnostic data (objects placed uniformly)"),
        ("same_compute", "Same compute (counted FLOPs of CLIP)"),
    ):
        if by_group[group]:
            reference = by_group["main"][:1] if group == "same_compute" else []
            out += [f"## {title}: zero-shot top-1 (%)", ""]
            out += accuracy_table(reference + by_group[group], "zeroshot_top1", with_paper=False) + [""]
    out += ["## The paper's orderings, checked", ""]
    out += [
        "Differences in zero-shot top-1 points. Between arms: difference of seed means ± its standard error; within "
        "an arm (tuning gain, masked-inference loss): mean of the per-seed differences ± its standard error. "
        "*holds* / *reversed* / *positive* / *negative* need more than 2 standard errors. With 3 seeds that is "
        "roughly p < 0.1 for one comparison (a t-test), not a 5% test, and this table makes many comparisons: read "
        "a verdict as a signal worth a bigger run, not as a settled result.",
        "",
    ]
    out += orderings_table(arms) + [""]
    out += ["## Training cost and throughput per arm", ""]
    out += compute_table(list(arms.values())) + [""]
    out += [
        "## Figures",
        "",
        f"![accuracy vs mask ratio]({figures['accuracy_vs_ratio.png']})",
        "",
        f"![accuracy vs training cost]({figures['accuracy_vs_cost.png']})",
        "",
        f"![loss curves]({figures['loss_curves.png']})",
        "",
        f"![masks]({figures['masks.png']})",
        "",
        f"The mask picture is the grid's own patch grid ({base['image_size']} px, patch {base['patch_size']}) at 75%, "
        "drawn by `glip_hf.masking.render_mask_figure` on a generated scene.",
        "",
    ]
    if not quick and READING.is_file():
        out += [READING.read_text().rstrip(), ""]
    return "\n".join(out)
