"""A study's report: ``report.json`` (every number), ``report.md`` (the paper's table layout) and
PNG plots. Every number in ``report.md`` is formatted from the same dict that ``report.json``
holds, so the two cannot disagree."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from prm_ray.artifacts import first_difference, write_json
from prm_ray.core.objectives import OBJECTIVES

__all__ = ["ci", "cost_ratios", "markdown", "merge_parts", "scaling_figure", "signed", "step_cell", "table1_markdown", "thresholds",
           "write_report"]


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _ns(report: dict) -> list[int]:
    keys = report["baseline"].keys()
    return sorted(int(k.split("@")[1]) for k in keys if k.startswith("bon@"))


def ci(x: float | None, interval: list[float] | None = None) -> str:
    """A percentage with its interval when there is one: ``72.0 [68.9, 75.1]``."""
    if interval is None or x is None or (isinstance(x, float) and math.isnan(x)):
        return _pct(x)
    return f"{_pct(x)} [{_pct(interval[0])}, {_pct(interval[1])}]"


def signed(d: dict) -> str:
    """A paired difference in points with its interval: ``+1.3 [-0.9, +3.6]``."""
    lo, hi = d["interval"]
    return f"{100 * d['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _cell(r: dict, key: str) -> str:
    return ci(r["metrics"][key], (r.get("intervals") or {}).get(key))


def _table(report: dict, kind: str, ns: list[int]) -> list[str]:
    head = "| reward model | " + " | ".join(f"@{n}" for n in ns) + " |"
    lines = [head, "|---|" + "---|" * len(ns)]
    for r in report["results"]:
        if r["metrics"] is None:
            lines.append(f"| {r['name']} | " + " | ".join("n/a" for _ in ns) + " |")
        else:
            lines.append(f"| {r['name']} | " + " | ".join(_cell(r, f"{kind}@{n}") for n in ns) + " |")
    return lines


def _baseline_cell(report: dict, which: str, key: str) -> str:
    return ci(report[which][key], (report.get(f"{which}_intervals") or {}).get(key))


def _baseline_rows(report: dict, ns: list[int]) -> list[str]:
    """The best-of-N table's rows without a PRM: the likelihood, voting, the oracle, pass@1."""
    lines = []
    if report.get("baseline_likelihood"):
        lines.append(f"| {likelihood_name(report)} (no PRM) | "
                     + " | ".join(_baseline_cell(report, "baseline_likelihood", f"bon@{k}") for k in ns) + " |")
    return lines + [
        "| majority voting | " + " | ".join(_baseline_cell(report, "baseline", f"majority@{k}") for k in ns) + " |",
        "| pass@N (oracle) | " + " | ".join("-" if k == 1 else _baseline_cell(report, "baseline", f"pass@{k}")
                                           for k in ns) + " |",
        "| pass@1 | " + " | ".join(_baseline_cell(report, "baseline", "pass@1") for _ in ns) + " |"]


def _differences(report: dict, ns: list[int]) -> list[str]:
    """Paired differences of every row against majority voting and the policy's likelihood."""
    rows = [r for r in report["results"] if r.get("differences")]
    if not rows:
        return []
    iv = report.get("intervals") or {}
    lines = ["", "## Differences against the baselines (paired over the same test problems)", "",
             f"Percentage points, mean over seeds, {100 * iv.get('level', 0.95):.0f}% interval in brackets: each "
             "bootstrap draw resamples the test problems for both sides and the row's training seeds. An interval "
             "above zero means the reward model beats the baseline beyond the noise of problems and seeds.", ""]
    for title, fmt in (("Best-of-N minus majority voting", "bon@{n} - majority@{n}"),
                       (f"Best-of-N minus best-of-N by the {likelihood_name(report)}",
                        "bon@{n} - policy likelihood bon@{n}"),
                       ("Weighted voting minus majority voting", "weighted_mv@{n} - majority@{n}")):
        keys = [(n, fmt.format(n=n)) for n in ns if n > 1]
        lines += [f"{title}:", "", "| reward model | " + " | ".join(f"@{n}" for n, _ in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        lines += [f"| {r['name']} | " + " | ".join(signed(r["differences"][k]) for _, k in keys) + " |" for r in rows]
        lik = report.get("baseline_likelihood_differences") or {}
        if fmt.startswith("bon@{n} - majority") and lik:
            lines.append(f"| {likelihood_name(report)} (no PRM) | " + " | ".join(signed(lik[k]) for _, k in keys) + " |")
        lines.append("")
    along = report.get("axis_differences") or {}
    if along:
        keys = [n for n in ns if n > 1]
        lines += [f"Along the axis (`{report['axis']}`): best-of-N of each row minus the first row of its series, "
                  "paired the same way (does moving along the axis help beyond the noise?):", "",
                  "| difference | " + " | ".join(f"@{n}" for n in keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {name} | " + " | ".join(signed(d[f"bon@{n}"]) for n in keys) + " |" for name, d in along.items()]
        lines.append("")
    return lines


def _prm_start(report: dict) -> str:
    """The header's sentence on the PRMs' starting model: nothing when it is the policy."""
    model = report["config"].get("prm_model")
    if not model:
        return ""
    params = f" ({report['prm_params']:,} parameters)" if "prm_params" in report else ""
    return f" PRMs start from `{model}`{params}."


def _test_source(report: dict) -> tuple[str, str]:
    """The header's sentence on who sampled the test responses, and the summary's subject."""
    g = report["test"].get("generator")
    if not g:
        return "", "Policy"
    t = f", temperature {g['temperature']}" if g.get("temperature") is not None else ""
    return (f" Test responses: generator `{g['name']}` (`{g['policy']}`{t}) in place of the policy, which the "
            f"PRMs are trained on as in every column of paper Table 1.", f"Generator `{g['name']}`")


def markdown(report: dict) -> str:
    ns = _ns(report)
    base = report["baseline"]
    n = report["headline_n"]
    cfg = report["config"]
    test = report["test"]
    source, subject = _test_source(report)
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
        f"Policy: `{cfg['policy']}` ({report['policy_params']:,} parameters).{_prm_start(report)}{source} Accuracy in %.",
        "",
        "## Summary",
        "",
        f"{subject} alone on the test problems: pass@1 {_pct(base['pass@1'])}, majority@{n} "
        f"{_pct(base[f'majority@{n}'])}, pass@{n} (oracle) {_pct(base[f'pass@{n}'])}"
        + (f", best-of-{n} by the {likelihood_name(report)} {_pct(report['baseline_likelihood'][f'bon@{n}'])}"
           if report.get("baseline_likelihood") else "") + ".",
        "",
    ]
    for r in report["results"]:
        if r["metrics"] is None:
            lines.append(f"- **{r['name']}**: not defined: {r['reason']}")
            continue
        m = r["metrics"]
        cost = f"; build cost {_pf(r['compute']['build_flops'])} PFLOP" if r.get("compute") else ""
        d = r.get("differences") or {}
        vs = (f"{signed(d[f'bon@{n} - majority@{n}'])} vs majority@{n}" if f"bon@{n} - majority@{n}" in d
              else f"{100 * (m[f'bon@{n}'] - base[f'majority@{n}']):+.1f} vs majority@{n}")
        seeds = f" ({len(r['seeds'])} seeds: " + ", ".join(_pct(x) for x in r["by_seed"][f"bon@{n}"]) + ")" \
            if len(r.get("seeds") or []) > 1 else ""
        lines.append(f"- **{r['name']}**: best-of-{n} {_cell(r, f'bon@{n}')}{seeds}; "
                     f"{100 * (m[f'bon@{n}'] - base['pass@1']):+.1f} vs pass@1, {vs}; "
                     f"weighted voting@{n} {_cell(r, f'weighted_mv@{n}')}{cost}")
    iv = report.get("intervals")
    lines += ["", "## Best-of-N (rows: reward model; columns: N)", ""]
    if iv:
        lines += [f"Mean over training seeds; in brackets the {100 * iv['level']:.0f}% interval ({iv['method']}, "
                  f"{iv['draws']} draws, seed {iv['seed']}).", ""]
    lines += _table(report, "bon", ns) + _baseline_rows(report, ns)
    lines += _differences(report, ns)
    if any(r.get("differences") for r in report["results"]):
        lines += ["![differences](differences.png)", ""]
    lines += _aggregation_section(report)
    lines += _generator_section(report, ns)
    lines += _reference_section(report)
    lines += _step_section(report)
    lines += ["", "## Weighted majority voting", ""]
    lines += _table(report, "weighted_mv", ns)
    lines += ["", "![best-of-N](bon_vs_n.png)", "", "![scaling](scaling.png)", ""]
    lines += ["## Training data per reward model", "",
              "| reward model | objective | responses / instruction | instruction fraction | balance "
              "| ref (train) | ref (inference) | lr | epochs | examples | steps |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        t = r.get("train") or {}
        tr = {**(cfg.get("train") or {}), **(r.get("train_overrides") or {})}
        lr = "-" if tr.get("lr") is None else f"{tr['lr']:g}"
        lines.append(f"| {r['name']} | {r['objective']} | {r['responses_per_instruction']} | "
                     f"{r['instruction_fraction']} | {r['balance']} | {r['reference']} | "
                     f"{r['reference_at_inference']} | {lr} | {tr.get('epochs', '-')} | {t.get('examples', '-')} | "
                     f"{t.get('steps', '-')} |")
    lines += _compute_section(report)
    lines += ["", "## Wall time and compute per stage", "",
              "Compute is estimated as 2 x parameters x tokens for generation and scoring, 6 x parameters "
              "x tokens for training (plus 2 x for the reference forward when trained with the reference). `reused`: finished by an earlier "
              "run of this or another study, so this run's wall time is only the check. *made*: the wall seconds of the "
              "run(s) that made the stage's output, kept next to it (`-`: not kept, e.g. the shipped policy).", "",
              "| stage | wall s this run | reused | wall s made | compute (PFLOP) |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        fl, made = s.get("flops"), s.get("made_wall_s")
        lines.append(f"| {s['stage']} | {s['wall_s']:.1f} | {s['reused']} | {'-' if made is None else f'{made:.1f}'} | "
                     f"{'-' if fl is None or not math.isfinite(fl) else f'{fl / 1e15:.4f}'} |")
    made = [s["made_wall_s"] for s in report["stages"] if s.get("made_wall_s") is not None]
    lines += ["", f"Total wall time of this run: {report['wall_seconds']:.0f} s "
              f"({report['wall_seconds'] / 60:.1f} min); the stages as made: {sum(made):.0f} s "
              f"({sum(made) / 3600:.1f} h; {len(made)} of {len(report['stages'])} stages kept their time; "
              "outputs shared with other studies are counted in each).", "",
              "Seeds: " + ", ".join(f"{k} {v}" for k, v in report["seeds"].items()) + ". "
              "The full resolved config is `config.yaml` next to this file.", ""]
    return "\n".join(lines)


def step_cell(m: dict, key: str) -> str:
    return ci(m[key], (m.get("intervals") or {}).get(key))


def thresholds(m: dict) -> str:
    return " / ".join(f"{t:.4g}" for t in (m.get("by_seed") or {}).get("threshold", [m["threshold"]]))


def _generator_section(report: dict, ns: list[int]) -> list[str]:
    """Paper Table 1's columns: the same reward models reranking other generators' responses."""
    gens = report.get("generators") or {}
    if not gens:
        return []
    show = [n for n in ns if n in (4, 16, 64)] or ns
    lines = ["", "## Other generators (paper Table 1: one reward model, responses of generators of different "
                 "strength)", "",
             "Each generator samples the same test problems; the reward models are the ones above (trained on the "
             "study's policy, with its reference). Best-of-N, mean over seeds with the interval; in brackets after "
             "the last column: best-of-N minus majority voting (paired).", ""]
    for name, g in gens.items():
        t = "" if g.get("temperature") is None else f", temperature {g['temperature']}"
        lines += [f"### {name} (`{g['policy']}`{t}; pass@1 {_pct(g['pass@1'])})", "",
                  "| reward model | " + " | ".join(f"@{n}" for n in show) + f" | @{show[-1]} - majority |",
                  "|---|" + "---|" * (len(show) + 1)]
        for r in report["results"]:
            x = (r.get("generators") or {}).get(name)
            if x is None:
                lines.append(f"| {r['name']} | " + " | ".join("n/a" for _ in show) + " | n/a |")
                continue
            lines.append(f"| {r['name']} | " + " | ".join(_cell(x, f"bon@{n}") for n in show)
                         + f" | {signed(x['differences'][f'bon@{show[-1]} - majority@{show[-1]}'])} |")
        lines += [f"| {likelihood_name(report)} (no PRM) | "
                  + " | ".join(_baseline_cell(g, "baseline_likelihood", f"bon@{n}") for n in show) + " | |",
                  "| majority voting | " + " | ".join(_baseline_cell(g, "baseline", f"majority@{n}") for n in show)
                  + " | |",
                  "| pass@N (oracle) | " + " | ".join("-" if n == 1 else _baseline_cell(g, "baseline", f"pass@{n}")
                                                     for n in show) + " | |", ""]
    return lines


def _aggregation_section(report: dict) -> list[str]:
    """Best-of-N of every row under each aggregation of its step rewards (the same scores)."""
    rows = [r for r in report["results"] if r.get("aggregations")]
    if not rows:
        return []
    n = report["headline_n"]
    methods = list(dict.fromkeys(m for r in rows for m in r["aggregations"]))
    lines = ["", f"## Best-of-{n} by aggregation of the step rewards", "",
             f"The same scores, aggregated otherwise (the study's own: `{report['config']['eval']['aggregation']}`): "
             "`sum` is an implicit PRM's outcome reward, `last` the last step's reward, `prod` the product of an "
             "explicit PRM's step probabilities; `-` where an aggregation means nothing for that kind of PRM.", "",
             "| reward model | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for r in rows:
        a = r["aggregations"]
        lines.append(f"| {r['name']} | " + " | ".join(_cell(a[m], f"bon@{n}") if m in a else "-" for m in methods) + " |")
    return lines


def reference_grid(report: dict) -> dict[tuple[bool, bool], dict]:
    """Table 4's cells: the plain CE rows (no balancing, every instruction and response) by
    (reference in training, reference at inference)."""
    n = report["headline_n"]
    full = (report.get("train_rollouts") or {}).get("responses_per_instruction")
    cells = {}
    for r in report["results"]:
        if r["metrics"] is None or r["objective"] != "ce" or r["balance"] != "none" or r["instruction_fraction"] != 1.0:
            continue
        if full is not None and r["responses_per_instruction"] != full:
            continue
        cells.setdefault((bool(r["reference"]), bool(r["reference_at_inference"])), r)
    return cells if len(cells) == 4 and all(f"bon@{n}" in c["metrics"] for c in cells.values()) else {}


def _reference_section(report: dict) -> list[str]:
    """Table 4 as the paper lays it out: the reference model in training x at inference."""
    cells = reference_grid(report)
    if not cells:
        return []
    n = report["headline_n"]
    lines = ["", f"## The reference model in training and at inference (paper Table 4; best-of-{n})", "",
             "| reference in training | at inference: on | at inference: off |", "|---|---|---|"]
    for train in (True, False):
        lines.append(f"| {'on' if train else 'off'} | "
                     + " | ".join(f"{_cell(cells[(train, infer)], f'bon@{n}')} ({cells[(train, infer)]['name']})"
                                  for infer in (True, False)) + " |")
    return lines


def _step_section(report: dict) -> list[str]:
    """The step-level table: does each reward model's step reward find the first wrong step?"""
    sl = report.get("step_level")
    if not sl:
        return []
    if sl.get("skipped"):
        return ["", f"Step-level table: not made ({sl['skipped']}).", ""]
    lab, val = sl["labels"], sl["validation"]
    lines = ["", "## Step level: does the reward find the first wrong step?", "",
             f"Ground truth: the task's step checker on every test response, split into the PRMs' own steps. "
             f"{lab['responses']} test responses: {lab['with_error']} with a wrong step, {lab['right_answer_wrong_process']} "
             f"of which reach the right answer anyway (an outcome label calls them right); {lab['without_error']} "
             f"without one; {lab['wrong_answer_no_step_error']} wrong answers without a step error. "
             f"Protocol of ProcessBench: a reward model predicts the first step whose reward is below its threshold; "
             f"*error acc.*: the first wrong step found exactly, on responses with one; *correct acc.*: no step "
             f"flagged, on responses without; F1 their harmonic mean. Each threshold is chosen on {val['problems']} "
             f"validation problems x {val['samples_per_problem']} (never on test). *Step AUC*: P(a right step "
             f"before a first error scores above that first wrong step), no threshold. In %.", "",
             "Mean over training seeds, with the interval over problems and seeds for the accuracies; the step AUC "
             "is the mean of the seeds' (listed in report.json). Thresholds: each seed's own.", "",
             "| reward model | F1 | error acc. | correct acc. | step AUC | threshold |", "|---|---|---|---|---|---|"]
    rows = [(r["name"], r.get("step_level")) for r in report["results"]]
    rows += [(f"{likelihood_name(report) if name == 'policy log-likelihood' else name} (no PRM)", m)
             for name, m in sl["baselines"].items()]
    for name, m in rows:
        if m is None:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a | n/a |")
            continue
        lines.append(f"| {name} | " + " | ".join(step_cell(m, k) for k in ("f1", "error_accuracy", "correct_accuracy",
                                                                           "step_auc"))
                     + f" | {thresholds(m)} |")
    kinds = [k for k in sl["kinds"] if lab["by_kind"].get(k)]
    if kinds:
        lines += ["", "First wrong step found exactly, by its kind (error acc. in %; responses in brackets):", "",
                  "| reward model | " + " | ".join(f"{k} ({lab['by_kind'][k]})" for k in kinds) + " |",
                  "|---|" + "---|" * len(kinds)]
        for name, m in rows:
            if m is not None:
                lines.append(f"| {name} | " + " | ".join(_pct(m["by_kind"][k]["error_accuracy"]) for k in kinds) + " |")
    lines += ["", "![step rewards](step_rewards.png)", "", "![F1 against the threshold](f1_threshold.png)"]
    return lines


def _explicit(row: dict) -> bool:
    obj = OBJECTIVES.get(row["objective"])
    return obj is not None and obj.explicit


def _pf(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e15:.4f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


COMPUTE_STAGES = ("generation", "verification", "step-label completions", "step-label verification",
                  "reference log-probs", "training", "scoring")


def likelihood_name(report: dict) -> str:
    """The likelihood baseline: the reference's log-likelihood (``likelihood_model``, the study's
    StudyConfig.reference), which is the policy's unless the study names another model."""
    model = report.get("likelihood_model")
    if model is None or model == (report.get("config") or {}).get("policy"):
        return "policy log-likelihood"
    return f"reference log-likelihood ({Path(str(model)).name})"


def cost_ratios(report: dict) -> list[dict]:
    """Build cost (data collection + training FLOPs) of every Math-Shepherd PRM over every implicit
    CE PRM of the report (the paper: about 38.8x)."""
    rows = [r for r in report["results"] if r.get("compute")]
    # An exact-label PRM's labels cost nothing here (a checker), so it has no cost ratio: it is the
    # accuracy bound of Math-Shepherd's labels, not a way to make them.
    ms = [r for r in rows if _explicit(r) and r.get("label_method", "monte_carlo") == "monte_carlo"]
    ce = [r for r in rows if r["objective"] == "ce"]
    return [{"explicit": m["name"], "implicit": c["name"],
             "ratio": m["compute"]["build_flops"] / c["compute"]["build_flops"],
             "data_ratio": _data_flops(m) / _data_flops(c),
             "generated_ratio": _generated_tokens(m) / _generated_tokens(c)}
            for m in ms for c in ce if c["compute"]["build_flops"] > 0]


def _data_flops(row: dict) -> float:
    """Data collection only: the responses and the step-label completions (no training)."""
    st = row["compute"]["stages"]
    return sum(st[k]["flops"] for k in ("generation", "step-label completions") if k in st)


def _generated_tokens(row: dict) -> float:
    """Sampled tokens only (responses and completions): the paper's count of trajectories."""
    st = row["compute"]["stages"]
    return sum(st[k].get("generated_tokens", 0) for k in ("generation", "step-label completions") if k in st)


# The paper's side of the cost comparison, as we read it (docs/baselines.md, "Line by line"):
# §2: "10-step rollouts and 8 subsequent trajectories for each step ... 10 x 8 = 80 trajectories"
# per response; §4 / Figure 3: Math-Shepherd costs 38.6-38.8x the FLOPs of CE. 80 completions
# that each sample the rest of a response (about half of it on average) are ~40 responses' worth
# of sampled tokens: the 38.8x matches sampled tokens alone, not training (CE's training, 4 x a
# response's sampling per response here, would pull any ratio that counts it far below 38.8).
PAPER_COST = {"steps": 10, "completions_per_boundary": 8, "completion_share": 0.5, "ratio": 38.8}


def cost_lines(report: dict) -> list[str]:
    """Math-Shepherd's labelling cost per response next to the paper's, and the ratio under three
    accountings: sampled tokens only (the paper's, as we read it), data FLOPs (adds each
    completion's prompt: the question and the steps before it) and build FLOPs (adds training)."""
    ratios = cost_ratios(report)
    rows = {r["name"]: r for r in report["results"]}
    if not ratios:
        return []
    lines = ["", "### Cost line by line against the paper", "",
             f"The paper: ~{PAPER_COST['steps']} steps per response x {PAPER_COST['completions_per_boundary']} "
             f"completions per step, each sampling the rest of the response (~{PAPER_COST['completion_share']:g} of "
             f"it); it reports {PAPER_COST['ratio']}x the FLOPs of CE, which matches the sampled tokens alone "
             "(docs/baselines.md). Per labelled response here:", "",
             "| Math-Shepherd PRM | steps | sampled boundaries | completions | tokens sampled per completion / per "
             "response | prompt tokens per completion |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(x["explicit"] for x in ratios):
        st = rows[name]["compute"]["stages"]
        gen, comp = st["generation"], st.get("step-label completions") or {}
        n, k = gen["responses"], max(1, comp.get("completions", 0))
        per_response = gen["generated_tokens"] / max(1, n)
        steps, bounds = comp.get("steps"), comp.get("boundaries")
        lines.append(f"| {name} | {'-' if steps is None else f'{steps / n:.2f}'} | "
                     f"{'-' if bounds is None else f'{bounds / n:.2f}'} | "
                     f"{comp.get('completions', 0) / n:.1f} | {comp.get('generated_tokens', 0) / k / per_response:.2f} | "
                     f"{comp.get('prompt_tokens', 0) / k:.0f} |")
    p = PAPER_COST
    lines += [f"| paper (as read) | ~{p['steps']} | ~{p['steps']} | {p['steps'] * p['completions_per_boundary']} | "
              f"~{p['completion_share']:g} | - |", "",
              "| ratio | sampled tokens (the paper's accounting) | data FLOPs (+ completion prompts) | "
              "build FLOPs (+ training) |", "|---|---|---|---|"]
    for x in ratios:
        lines.append(f"| {x['explicit']} / {x['implicit']} | {x['generated_ratio']:.1f}x | {x['data_ratio']:.1f}x | "
                     f"{x['ratio']:.1f}x |")
    implied = 1 + p["steps"] * p["completions_per_boundary"] * p["completion_share"]
    lines += [f"| paper (as read): 1 + {p['steps']} x {p['completions_per_boundary']} x {p['completion_share']:g} "
              f"= {implied:.0f}x; reported {p['ratio']}x | | | |"]
    return lines


def _compute_section(report: dict) -> list[str]:
    rows = [r for r in report["results"] if r.get("compute")]
    if not rows:
        return []
    n = report["headline_n"]
    lines = ["", "## Accuracy and compute per reward model", "",
             "FLOPs are estimated from the parameter count of the model each stage runs (the policy samples; the "
             "reference pass, training and scoring run the PRMs' model) and the token counts of each stage: "
             "2 x parameters per token for a forward pass (sampling, reference log-probs, scoring), 6 x for "
             "training (`prm_ray/core/flops.py`). *Build* is everything needed to make the PRM (data collection "
             "and training), the paper's cost; *total* adds scoring the held-out responses. Seconds: wall "
             "(CPU) time measured for the stage, charged in proportion to the tokens a PRM uses of a shared "
             "stage; `-` where the run that made it did not record it. PFLOP = 1e15 FLOPs.", ""]
    ratios = cost_ratios(report)
    for x in ratios:
        lines.append(f"- **{x['explicit']}** costs **{x['ratio']:.1f}x** the build FLOPs of **{x['implicit']}** "
                     f"({x['generated_ratio']:.1f}x its sampled tokens, the paper's 38.8x accounting).")
    if ratios:
        lines.append("")
    # Verification runs no model (0 FLOPs): its seconds and counts are in report.json.
    present = [s for s in COMPUTE_STAGES if "verification" not in s and any(s in r["compute"]["stages"] for r in rows)]
    lines.append(f"| reward model | best-of-{n} | " + " | ".join(f"{s} PFLOP" for s in present)
                 + " | build PFLOP | total PFLOP | build wall s | build CPU s |")
    lines.append("|---|---|" + "---|" * (len(present) + 4))
    for r in rows:
        c = r["compute"]
        st = c["stages"]
        # Verification seconds overlap generation (the same streaming pipeline): not added again.
        timed = [v for k, v in st.items() if k not in ("scoring", "verification", "step-label verification")]
        walls, cpus = [v.get("wall_s") for v in timed], [v.get("cpu_s") for v in timed]
        wall = None if any(w is None for w in walls) else sum(walls)
        cpu = None if any(x is None for x in cpus) else sum(cpus)
        lines.append(f"| {r['name']} | {_pct(r['metrics'][f'bon@{n}'])} | "
                     + " | ".join(_pf(st[s]["flops"]) if s in st else "-" for s in present)
                     + f" | {_pf(c['build_flops'])} | {_pf(c['total_flops'])} | {_s(wall)} | {_s(cpu)} |")
    lines += cost_lines(report)
    lines += ["", "![accuracy vs compute](accuracy_vs_flops.png)", "", "![cost per stage](cost.png)"]
    return lines


def compute_plots(report: dict, out: Path) -> list[Path]:
    """The paper's Figure 1 (accuracy against build FLOPs) and Figure 3 (cost per stage)."""
    rows = [r for r in report["results"] if r.get("compute")]
    if not rows:
        return []
    n = report["headline_n"]
    base = report["baseline"]
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for r in rows:
        explicit = _explicit(r)
        x, y = r["compute"]["build_flops"], 100 * r["metrics"][f"bon@{n}"]
        lo, hi = (100 * v for v in (r.get("intervals") or {}).get(f"bon@{n}", (y / 100, y / 100)))
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], marker="s" if explicit else "o", ms=7, capsize=3,
                    color="#cc6677" if explicit else "#4477aa")
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(100 * base[f"majority@{n}"], color="k", ls="--", label=f"majority@{n}")
    ax.axhline(100 * base["pass@1"], color="grey", ls=":", label="pass@1")
    ax.set_xscale("log")
    ax.set_xlabel("build FLOPs (data collection + training)")
    ax.set_ylabel(f"best-of-{n} accuracy (%)")
    ax.set_title("Accuracy against cost (circles: implicit PRM, squares: Math-Shepherd)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = [out / "accuracy_vs_flops.png"]
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.5))

    ax = fig.subplots()
    left = [0.0] * len(rows)
    names = [r["name"] for r in rows]
    for stage_name in COMPUTE_STAGES:
        if stage_name == "scoring":
            continue
        vals = [r["compute"]["stages"].get(stage_name, {}).get("flops", 0.0) / 1e15 for r in rows]
        if any(vals):
            ax.barh(names, vals, left=left, label=stage_name)
            left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("build PFLOP")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "cost.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


def scaling_figure(report: dict) -> Figure:
    """Best-of-N at the headline N along the study's axis, a line per series, with intervals."""
    base = report["baseline"]
    n = report["headline_n"]
    axis = report["axis"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    groups: dict[str, list] = {}
    for r in report["results"]:
        if r["metrics"] is not None and axis in r["axis"]:
            y = 100 * r["metrics"][f"bon@{n}"]
            lo, hi = (100 * v for v in (r.get("intervals") or {}).get(f"bon@{n}", (y / 100, y / 100)))
            groups.setdefault(r["axis"].get("series", r["objective"]), []).append((r["axis"][axis], y, y - lo, hi - y))
    categorical = any(isinstance(p[0], str) for pts in groups.values() for p in pts)
    xs = sorted({p[0] for pts in groups.values() for p in pts}, key=lambda x: (str(type(x)), x))
    # Doublings (k = 1, 2, 4, 8 responses; 1k-8k instructions) evenly spaced, as the paper plots them.
    log2 = not categorical and len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 4
    span = 1.0 if categorical or len(xs) < 2 else float(math.log2(max(xs) / min(xs)) if log2 else max(xs) - min(xs))
    for i, (name, pts) in enumerate(groups.items()):
        pts.sort(key=lambda p: (str(type(p[0])), p[0]))
        # Series side by side (dodged), so that their error bars do not hide each other.
        shift = (i - (len(groups) - 1) / 2) * 0.02 * span
        x = [xs.index(p[0]) + shift if categorical else p[0] * 2 ** shift if log2 else p[0] + shift for p in pts]
        ax.errorbar(x, [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]], marker="o", capsize=3,
                    label=name)
    if categorical:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=20, fontsize=7)
    xlabel = axis
    instructions = (report.get("train_rollouts") or {}).get("instructions")
    if log2:
        ax.set_xscale("log", base=2)
        labels = [f"{x:g}" for x in xs]
        if axis == "instruction_fraction" and instructions:  # paper Figure 4's axis: instructions
            labels = [f"{round(x * instructions):,}" for x in xs]
            xlabel = f"training instructions (of {instructions:,})"
        ax.set_xticks(xs, labels)
        ax.minorticks_off()
    ax.axhline(100 * base[f"majority@{n}"], color="k", ls="--", label=f"majority@{n}")
    ax.axhline(100 * base["pass@1"], color="grey", ls=":", label="pass@1")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"best-of-{n} accuracy (%)" + (", with intervals" if report.get("intervals") else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plots(report: dict, out: Path) -> list[Path]:
    ns = _ns(report)
    base = report["baseline"]
    paths = []
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    def band(values: dict, intervals: dict | None, key: str, **style) -> None:
        line = ax.plot(ns, [100 * values[f"{key}@{n}"] for n in ns], **style)[0]
        if intervals:  # the shaded band: each N's interval over problems and seeds
            ax.fill_between(ns, [100 * intervals[f"{key}@{n}"][0] for n in ns],
                            [100 * intervals[f"{key}@{n}"][1] for n in ns], color=line.get_color(), alpha=0.12)

    # Only the baselines get bands: the rows' intervals overlap into a blur; their paired
    # differences, which decide the comparisons, are differences.png.
    for r in report["results"]:
        if r["metrics"] is not None:
            band(r["metrics"], None, "bon", marker="o", label=r["name"])
    band(base, report.get("baseline_intervals"), "majority", color="k", ls="--", label="majority voting")
    if report.get("baseline_likelihood"):
        band(report["baseline_likelihood"], report.get("baseline_likelihood_intervals"), "bon", color="grey",
             ls="-.", label=likelihood_name(report))
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

    n = report["headline_n"]
    fig = scaling_figure(report)
    paths.append(out / "scaling.png")
    fig.savefig(paths[-1], dpi=120)

    rows = [r for r in report["results"] if r.get("differences")]
    if rows:
        fig = Figure(figsize=(6.5, 0.4 * len(rows) + 1.5))
        ax = fig.subplots()
        for i, r in enumerate(rows):
            for j, (key, color, label) in enumerate(((f"bon@{n} - majority@{n}", "#4477aa", f"minus majority@{n}"),
                                                     (f"bon@{n} - policy likelihood bon@{n}", "#cc6677",
                                                      f"minus the {likelihood_name(report)}'s best-of-{n}"))):
                d = r["differences"][key]
                y, lo, hi = 100 * d["mean"], 100 * d["interval"][0], 100 * d["interval"][1]
                ax.errorbar([y], [i + 0.15 * (2 * j - 1)], xerr=[[y - lo], [hi - y]], fmt="o", color=color, capsize=3,
                            label=label if i == 0 else None)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"best-of-{n}: difference in points (paired, {100 * report['intervals']['level']:.0f}% interval)")
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)  # clear of the label
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        paths.append(out / "differences.png")
        fig.savefig(paths[-1], dpi=120)

    if not report["stages"]:  # a figure merged from parts (merge_parts): each part has its own
        return paths
    fig = Figure(figsize=(7, 0.35 * len(report["stages"]) + 1.2))
    ax = fig.subplots()
    names = [s["stage"] for s in report["stages"]]
    ax.barh(names, [s["wall_s"] if s.get("made_wall_s") is None else s["made_wall_s"] for s in report["stages"]],
            color=["#bbb" if s["reused"] else "#4477aa" for s in report["stages"]])
    ax.invert_yaxis()
    ax.set_xlabel("wall seconds to make each stage (grey: made by an earlier run, reused by this one)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    paths.append(out / "stages.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


# What makes two studies' PRMs the same PRMs (everything else may differ between Table 1's parts).
PRM_FIELDS = ("policy", "prm_model", "reference_model", "seeds", "objectives", "train", "train_rollouts",
              "max_pairs_per_instruction")


def _explicit_rows(baselines: dict, part: dict, g: str) -> dict[str, dict]:
    """The explicit (Math-Shepherd) PRMs' numbers of a compare_baselines report on generator
    ``g``'s test responses, keyed by row name: its own test set, or one of its ``generators``,
    whichever sampled the same responses as ``part`` (same baselines); none if neither did."""
    rows = [r for r in baselines["results"] if str(r.get("objective", "")).startswith("math-shepherd")
            and r.get("metrics") is not None]
    if baselines["baseline"] == part["baseline"]:
        return {r["name"]: r for r in rows}
    other = (baselines.get("generators") or {}).get(g)
    if other is not None and other.get("baseline") == part["baseline"]:
        return {r["name"]: r["generators"][g] for r in rows if g in (r.get("generators") or {})}
    return {}


def table1_markdown(parts: dict[str, dict], links: dict[str, str] | None = None,
                    ns: tuple[int, ...] | None = None, baselines: dict | None = None,
                    baselines_link: str | None = None) -> str:
    """Paper Table 1 from one report per generator (``make paper``'s compare_objectives/table1*,
    keyed by column; ``links``: where each report is): each reward model's best-of-N on each
    generator's responses, with the generators' baselines (``ns``: the paper's 4, 16, 64, those
    the reports have). Parts whose PRMs were trained otherwise are named under the table.
    ``baselines``: a compare_baselines report (at ``baselines_link``), whose Math-Shepherd PRMs
    join the table in the columns whose test responses it scored (``n/a`` in the others)."""
    links = links or {}
    names = list(parts)
    first = parts[names[0]]
    n = first["headline_n"]
    ns = ns or [k for k in (4, 16, 64) if f"majority@{k}" in first["baseline"]] or [n]
    head = " | ".join(f"{g} @{k}" for g in names for k in ns)
    lines = ["# Paper Table 1: training objectives x generators", "",
             "Best-of-N (%) of each reward model on the responses of generators of different strength, mean over "
             f"training seeds with the {100 * first['intervals']['level']:.0f}% interval; the last columns: "
             f"best-of-{n} minus majority@{n} (paired over problems and seeds), per generator. One study per "
             "generator (`make paper`'s compare_objectives/table1*), the same PRMs in each: trained on the policy's "
             "responses and scored on each generator's.", ""]
    for g, rep in parts.items():
        src = rep["test"].get("generator") or {"policy": rep["config"]["policy"], "temperature": None}
        t = "" if src.get("temperature") is None else f", temperature {src['temperature']}"
        lines.append(f"- **{g}**: `{src['policy']}`{t}; pass@1 {_pct(rep['baseline']['pass@1'])}; "
                     f"{rep['test']['problems']} problems x {rep['test']['samples_per_problem']}"
                     + (f" ([report]({links[g]}))" if g in links else ""))
    lines += ["", f"| reward model | {head} | " + " | ".join(f"{g}: @{n} - majority" for g in names) + " |",
              "|---|" + "---|" * (len(names) * (len(ns) + 1))]
    by_part = {g: {r["name"]: r for r in rep["results"] if r["metrics"] is not None} for g, rep in parts.items()}
    rows = list(dict.fromkeys(r["name"] for rep in parts.values() for r in rep["results"]))
    explicit = {g: _explicit_rows(baselines, rep, g) for g, rep in parts.items()} if baselines else {}
    explicit_names = list(dict.fromkeys(name for e in explicit.values() for name in e))
    for name in rows + explicit_names:
        cells, diffs = [], []
        for g in parts:
            r = (explicit[g] if name in explicit_names else by_part[g]).get(name)
            cells += ["n/a" if r is None or f"bon@{k}" not in r["metrics"] else _cell(r, f"bon@{k}") for k in ns]
            d = (r or {}).get("differences") or {}
            diffs.append(signed(d[f"bon@{n} - majority@{n}"]) if f"bon@{n} - majority@{n}" in d else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells + diffs) + " |")
    for label, which, key in ((f"{likelihood_name(first)} (no PRM)", "baseline_likelihood", "bon@{}"),
                              ("majority voting", "baseline", "majority@{}"), ("pass@N (oracle)", "baseline", "pass@{}")):
        cells = [_baseline_cell(rep, which, key.format(k)) for rep in parts.values() for k in ns]
        lines.append(f"| {label} | " + " | ".join(cells + [""] * len(names)) + " |")
    for g, rep in parts.items():
        field = first_difference({k: first["config"].get(k) for k in PRM_FIELDS},
                                 {k: rep["config"].get(k) for k in PRM_FIELDS})
        if field:
            lines += ["", f"**Not the same PRMs**: `{g}`'s were trained with another `{field}` than `{names[0]}`'s."]
    if explicit_names:
        scored = [g for g in names if explicit[g]]
        src = f"[compare_baselines]({baselines_link})" if baselines_link else "compare_baselines"
        lines += ["", f"{', '.join(f'`{x}`' for x in explicit_names)}: {src}'s explicit PRMs (Math-Shepherd step "
                  f"labels from {baselines['config'].get('shepherd', {}).get('completions_per_step', '?')} completions "
                  "per step, hard or soft; `exact`: the step checker's own labels of the same responses, the best any "
                  "completion estimate can do), scored on the responses of "
                  + ", ".join(f"`{g}`" for g in scored) + "; `n/a` where that study did not score a generator."]
        for field_ in ("policy", "train_rollouts"):
            if baselines["config"].get(field_) != first["config"].get(field_):
                lines += ["", f"**Not the same training data**: compare_baselines' `{field_}` is not `{names[0]}`'s."]
    return "\n".join(lines) + "\n"


def merge_parts(parts: dict[str, dict], out: Path, links: dict[str, str] | None = None) -> str:
    """One figure from a study split into parts along its axis (``make paper``'s
    scale_instructions/*): the rows of every part side by side, each with its own intervals and
    paired differences, and the study's plots into ``out``; the markdown is returned. The parts
    must share their test responses (the same baselines), or their rows would not be paired."""
    names = list(parts)
    first = parts[names[0]]
    for name in names[1:]:
        if parts[name]["baseline"] != first["baseline"]:
            raise ValueError(f"{name} has other test responses than {names[0]} (its majority voting differs): "
                             "parts of one figure must be run where they sample the same test responses")
    axis = first["axis"]
    # A row in two parts (a part may repeat another's first row, whose PRMs and evaluations it
    # reuses, to pair its own rows against it) is shown once; it must be the same there.
    by_name: dict[str, tuple[str, dict]] = {}
    for part, rep in parts.items():
        for r in rep["results"]:
            if r["name"] in by_name and by_name[r["name"]][1]["metrics"] != r["metrics"]:
                raise ValueError(f"row {r['name']} differs between parts {by_name[r['name']][0]} and {part}")
            by_name.setdefault(r["name"], (part, r))
    rows = sorted((r for _, r in by_name.values()),
                  key=lambda r: (str(r["axis"].get("series", "")), r["axis"].get(axis, 0)))
    along = {k: v for rep in parts.values() for k, v in (rep.get("axis_differences") or {}).items()}
    merged = {**first, "results": rows, "stages": [], "axis_differences": along}
    out.mkdir(parents=True, exist_ok=True)
    plots(merged, out)
    ns = _ns(merged)
    links = links or {}
    lines = [f"# {first['title']}", "",
             f"Rows of {len(names)} studies run apart, on the same {first['test']['problems']} test problems x "
             f"{first['test']['samples_per_problem']} responses (the same baselines, so every difference is paired). "
             "Mean over training seeds with the "
             f"{100 * first['intervals']['level']:.0f}% interval. Parts: "
             + ", ".join(f"[{n}]({links[n]})" if n in links else n for n in names) + ".", "",
             "## Best-of-N (rows: reward model; columns: N)", "",
             *_table(merged, "bon", ns), *_baseline_rows(merged, ns), *_differences(merged, ns),
             "![scaling](scaling.png)", "", "![best-of-N](bon_vs_n.png)", ""]
    if any(r.get("differences") for r in rows):
        lines += ["![differences](differences.png)", ""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    plots(report, out)
    compute_plots(report, out)
    (out / "report.md").write_text(markdown(report) + "\n")
