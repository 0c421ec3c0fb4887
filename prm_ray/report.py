"""A study's report: ``report.json`` (every number), ``report.md`` (the paper's table layout) and
PNG plots. Every number in ``report.md`` is formatted from the same dict that ``report.json``
holds, so the two cannot disagree."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ns(report: dict) -> list[int]:
    keys = report["baseline"].keys()
    return sorted(int(k.split("@")[1]) for k in keys if k.startswith("bon@"))


def _table(report: dict, kind: str, ns: list[int]) -> list[str]:
    head = "| reward model | " + " | ".join(f"@{n}" for n in ns) + " |"
    lines = [head, "|---|" + "---|" * len(ns)]
    for r in report["results"]:
        if r["metrics"] is None:
            lines.append(f"| {r['name']} | " + " | ".join("n/a" for _ in ns) + " |")
        else:
            lines.append(f"| {r['name']} | " + " | ".join(_pct(r["metrics"][f"{kind}@{n}"]) for n in ns) + " |")
    return lines


def markdown(report: dict) -> str:
    ns = _ns(report)
    base = report["baseline"]
    n = report["headline_n"]
    cfg = report["config"]
    test = report["test"]
    lines = [
        f"# {report['title']}",
        "",
        f"Study `{report['study']}`: {sum(r['metrics'] is not None for r in report['results'])} reward models "
        f"trained (undefined rows: {sum(r['metrics'] is None for r in report['results'])}), evaluated on "
        f"{test['problems']} held-out {test['task']} problems ({test['split']} split) x "
        f"{test['samples_per_problem']} samples, protocol `{cfg['eval']['protocol']}`, aggregation "
        f"`{cfg['eval']['aggregation']}`, weighted-vote coefficient {cfg['eval']['vote_coef']}. "
        f"Training rollouts: {report['train_rollouts']['instructions']} instructions, "
        f"{report['train_rollouts']['responses']} responses (pass@1 {_pct(report['train_rollouts']['pass@1'])}%). "
        f"Policy: `{cfg['policy']}` ({report['policy_params']:,} parameters). Accuracy in %.",
        "",
        "## Summary",
        "",
        f"Policy alone on the test problems: pass@1 {_pct(base['pass@1'])}, majority@{n} "
        f"{_pct(base[f'majority@{n}'])}, pass@{n} (oracle) {_pct(base[f'pass@{n}'])}"
        + (f", best-of-{n} by the policy's own log-likelihood {_pct(report['baseline_likelihood'][f'bon@{n}'])}"
           if report.get("baseline_likelihood") else "") + ".",
        "",
    ]
    for r in report["results"]:
        if r["metrics"] is None:
            lines.append(f"- **{r['name']}**: not defined: {r['reason']}")
            continue
        m = r["metrics"]
        lines.append(f"- **{r['name']}**: best-of-{n} {_pct(m[f'bon@{n}'])} "
                     f"({100 * (m[f'bon@{n}'] - base['pass@1']):+.1f} vs pass@1, "
                     f"{100 * (m[f'bon@{n}'] - base[f'majority@{n}']):+.1f} vs majority@{n}); "
                     f"weighted voting@{n} {_pct(m[f'weighted_mv@{n}'])}")
    lines += ["", "## Best-of-N (rows: reward model; columns: N)", ""]
    lines += _table(report, "bon", ns)
    lik = report.get("baseline_likelihood")
    if lik:
        lines.append("| policy log-likelihood (no PRM) | " + " | ".join(_pct(lik[f"bon@{k}"]) for k in ns) + " |")
    lines += ["| majority voting | " + " | ".join(_pct(base[f"majority@{k}"]) for k in ns) + " |",
              "| pass@N (oracle) | " + " | ".join("-" if k == 1 else _pct(base[f"pass@{k}"]) for k in ns) + " |",
              "| pass@1 | " + " | ".join(_pct(base["pass@1"]) for _ in ns) + " |"]
    lines += ["", "## Weighted majority voting", ""]
    lines += _table(report, "weighted_mv", ns)
    lines += ["", "![best-of-N](bon_vs_n.png)", "", "![scaling](scaling.png)", ""]
    lines += ["## Training data per reward model", "",
              "| reward model | objective | responses / instruction | instruction fraction | balance "
              "| ref (train) | ref (inference) | examples | steps |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        t = r.get("train") or {}
        lines.append(f"| {r['name']} | {r['objective']} | {r['responses_per_instruction']} | "
                     f"{r['instruction_fraction']} | {r['balance']} | {r['reference']} | "
                     f"{r['reference_at_inference']} | {t.get('examples', '-')} | {t.get('steps', '-')} |")
    lines += ["", "## Wall time and compute per stage", "",
              "Compute is estimated as 2 x parameters x tokens for generation and scoring, 6 x parameters "
              "x tokens for training (plus 2 x for the reference forward when trained with the reference). `reused`: finished by an earlier "
              "run of this or another study, so this run's wall time is only the check.", "",
              "| stage | wall s | reused | compute (PFLOP) |", "|---|---|---|---|"]
    for s in report["stages"]:
        fl = s.get("flops")
        lines.append(f"| {s['stage']} | {s['wall_s']:.1f} | {s['reused']} | "
                     f"{'-' if fl is None or not math.isfinite(fl) else f'{fl / 1e15:.4f}'} |")
    lines += ["", f"Total wall time of this run: {report['wall_seconds']:.0f} s "
              f"({report['wall_seconds'] / 60:.1f} min).", "",
              "Seeds: " + ", ".join(f"{k} {v}" for k, v in report["seeds"].items()) + ". "
              "The full resolved config is `config.yaml` next to this file.", ""]
    return "\n".join(lines)


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = _ns(report)
    base = report["baseline"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["results"]:
        if r["metrics"] is not None:
            ax.plot(ns, [100 * r["metrics"][f"bon@{n}"] for n in ns], marker="o", label=r["name"])
    ax.plot(ns, [100 * base[f"majority@{n}"] for n in ns], "k--", label="majority voting")
    if report.get("baseline_likelihood"):
        lik = report["baseline_likelihood"]
        ax.plot(ns, [100 * lik[f"bon@{n}"] for n in ns], color="grey", ls="-.", label="policy log-likelihood")
    ax.axhline(100 * base["pass@1"], color="grey", ls=":", label="pass@1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (responses per problem)")
    ax.set_ylabel("best-of-N accuracy (%)")
    ax.set_title(report["title"], fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "bon_vs_n.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    n = report["headline_n"]
    axis = report["axis"]
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list] = {}
    for r in report["results"]:
        if r["metrics"] is not None and axis in r["axis"]:
            groups.setdefault(r["axis"].get("series", r["objective"]), []).append(
                (r["axis"][axis], 100 * r["metrics"][f"bon@{n}"]))
    categorical = False
    for name, pts in groups.items():
        pts.sort(key=lambda p: (str(type(p[0])), p[0]))
        categorical = categorical or any(isinstance(p[0], str) for p in pts)
        ax.plot([str(p[0]) if categorical else p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axhline(100 * base[f"majority@{n}"], color="k", ls="--", label=f"majority@{n}")
    ax.axhline(100 * base["pass@1"], color="grey", ls=":", label="pass@1")
    ax.set_xlabel(axis)
    ax.set_ylabel(f"best-of-{n} accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "scaling.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(report["stages"]) + 1.2))
    names = [s["stage"] for s in report["stages"]]
    ax.barh(names, [s["wall_s"] for s in report["stages"]],
            color=["#bbb" if s["reused"] else "#4477aa" for s in report["stages"]])
    ax.invert_yaxis()
    ax.set_xlabel("wall seconds this run (grey: reused)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    paths.append(out / "stages.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plots(report, out)
    (out / "report.md").write_text(markdown(report) + "\n")
