"""The study report from a hand-made result dict: tables match the numbers, undefined rows shown."""

import json

import pytest

from prm_ray.study.report import write_report


def _metrics(bon: float) -> dict:
    out = {"pass@1": 0.5}
    for n in (1, 2, 4):
        out.update({f"bon@{n}": bon, f"weighted_mv@{n}": 0.6, f"majority@{n}": 0.55})
        if n > 1:
            out[f"pass@{n}"] = 0.9
    return out


def test_report_files_and_numbers(tmp_path):
    report = {
        "study": "s", "title": "t", "axis": "responses_per_instruction", "headline_n": 4,
        "results": [
            {"name": "ce-k4", "objective": "ce", "responses_per_instruction": 4, "instruction_fraction": 1.0,
             "balance": "none", "reference": True, "reference_at_inference": True, "status": "ok",
             "axis": {"responses_per_instruction": 4, "series": "ce"}, "metrics": _metrics(0.8125),
             "train": {"examples": 10, "steps": 2}},
            {"name": "dpo-k1", "objective": "dpo", "responses_per_instruction": 1, "instruction_fraction": 1.0,
             "balance": "none", "reference": True, "reference_at_inference": True, "status": "undefined",
             "reason": "no pairs", "axis": {"responses_per_instruction": 1, "series": "dpo"}, "metrics": None},
        ],
        "baseline": _metrics(0.5), "baseline_likelihood": _metrics(0.7),
        "config": {"policy": "p", "eval": {"protocol": "first", "aggregation": "min", "vote_coef": 0.001}},
        "seeds": {"train": 0}, "stages": [{"stage": "train ce-k4", "wall_s": 1.5, "reused": False, "flops": 2e12}],
        "wall_seconds": 3.0, "policy_params": 1000,
        "test": {"problems": 2, "samples_per_problem": 4, "split": "test", "task": "arith"},
        "train_rollouts": {"instructions": 3, "responses": 12, "pass@1": 0.5},
    }
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| ce-k4 | 81.2 | 81.2 | 81.2 |" in md
    assert "| dpo-k1 | n/a | n/a | n/a |" in md and "**dpo-k1**: not defined: no pairs" in md
    assert "| policy log-likelihood (no PRM) | 70.0 | 70.0 | 70.0 |" in md
    assert "+31.2 vs pass@1" in md and "+26.2 vs majority@4" in md
    assert json.loads((tmp_path / "report.json").read_text())["results"][1]["metrics"] is None
    for png in ("bon_vs_n.png", "scaling.png", "stages.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "PRMs start from" not in md  # PRMs start from the policy: nothing more to say
    report["config"]["prm_model"], report["prm_params"], report["likelihood_model"] = "big", 3000, "big"
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Policy: `p` (1,000 parameters). PRMs start from `big` (3,000 parameters)." in md
    assert "| reference log-likelihood (big) (no PRM) | 70.0 |" in md


def _row(name, bon, reference=False, infer=False, **extra):
    return {"name": name, "objective": "ce", "responses_per_instruction": 8, "instruction_fraction": 1.0,
            "balance": "none", "reference": reference, "reference_at_inference": infer, "status": "ok",
            "axis": {"objective": name}, "metrics": _metrics(bon), "train": {"examples": 10, "steps": 2}, **extra}


def test_intervals_differences_and_the_reference_grid(tmp_path):
    """Every cell carries its interval; the differences table and Table 4's 2x2 come from the same dict."""
    iv = {k: [v - 0.05, v + 0.04] for k, v in _metrics(0.8).items()}
    diff = {f"{k}@{n} - {b}": {"mean": 0.2, "interval": [0.1, 0.3]}
            for n in (1, 2, 4) for k, b in (("bon", f"majority@{n}"), ("weighted_mv", f"majority@{n}"),
                                            ("bon", f"policy likelihood bon@{n}"))}
    rows = [_row("ce", 0.8, intervals=iv, differences=diff, seeds=[0, 1], by_seed={"bon@4": [0.75, 0.85]}),
            _row("ce_ref_on_on", 0.6, True, True), _row("ce_ref_on_off", 0.7, True, False),
            _row("ce_ref_off_on", 0.65, False, True)]
    report = {
        "study": "s", "title": "t", "axis": "objective", "headline_n": 4, "results": rows,
        "baseline": _metrics(0.5), "baseline_intervals": {k: [0.4, 0.6] for k in _metrics(0.5)},
        "baseline_likelihood": _metrics(0.7),
        "intervals": {"level": 0.95, "draws": 2000, "seed": 0, "method": "bootstrap"},
        "config": {"policy": "p", "eval": {"protocol": "first", "aggregation": "min", "vote_coef": 0.001}},
        "seeds": {"train": [0, 1]}, "stages": [], "wall_seconds": 3.0, "policy_params": 1000,
        "test": {"problems": 2, "samples_per_problem": 4, "split": "test", "task": "arith"},
        "train_rollouts": {"instructions": 3, "responses": 24, "responses_per_instruction": 8, "pass@1": 0.5},
    }
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| ce | 80.0 [75.0, 84.0] | 80.0 [75.0, 84.0] | 80.0 [75.0, 84.0] |" in md
    assert "| majority voting | 55.0 [40.0, 60.0] |" in md
    assert "best-of-4 80.0 [75.0, 84.0] (2 seeds: 75.0, 85.0)" in md and "+20.0 [+10.0, +30.0] vs majority@4" in md
    assert "| ce | +20.0 [+10.0, +30.0] | +20.0 [+10.0, +30.0] |" in md  # @2, @4 of each differences table
    assert "Along the axis" not in md  # none in this study
    report["axis_differences"] = {"ce-k8 - ce-k2": {f"bon@{n}": {"mean": 0.01 * n, "interval": [-0.01, 0.05]}
                                                    for n in (1, 2, 4)}}
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| difference | @2 | @4 |\n|---|---|---|\n| ce-k8 - ce-k2 | +2.0 [-1.0, +5.0] | +4.0 [-1.0, +5.0] |" in md
    grid = md.split("paper Table 4")[1]
    assert "| on | 60.0 (ce_ref_on_on) | 70.0 (ce_ref_on_off) |" in grid
    assert "| off | 65.0 (ce_ref_off_on) | 80.0 [75.0, 84.0] (ce) |" in grid
    # Without the fourth cell there is no grid.
    report["results"] = rows[:3]
    write_report(report, tmp_path)
    assert "paper Table 4" not in (tmp_path / "report.md").read_text()


def test_cost_line_by_line_against_the_paper():
    """Math-Shepherd over CE under three accountings, from hand-made token and FLOP counts."""
    from prm_ray.study.report import cost_lines, cost_ratios

    def compute(stages):
        return {"stages": stages, "build_flops": sum(s["flops"] for s in stages.values())}

    gen = {"flops": 100.0, "generated_tokens": 40, "prompt_tokens": 10, "responses": 4}
    ce = _row("ce-k2", 0.8, compute=compute({"generation": gen, "training": {"flops": 300.0}}))
    ms = {**_row("math-shepherd-hard", 0.5, compute=compute({
        "generation": gen, "training": {"flops": 200.0},
        "step-label completions": {"flops": 1500.0, "generated_tokens": 320, "prompt_tokens": 800, "completions": 64,
                                   "steps": 20, "boundaries": 8}})), "objective": "math-shepherd-hard"}
    exact = {**ms, "name": "math-shepherd-exact", "label_method": "exact"}  # a checker's labels: no ratio
    (x,) = cost_ratios({"results": [ce, ms, exact]})
    assert (x["explicit"], x["implicit"]) == ("math-shepherd-hard", "ce-k2")
    assert (x["generated_ratio"], x["data_ratio"], x["ratio"]) == (360 / 40, 1600 / 100, 1800 / 400)
    md = "\n".join(cost_lines({"results": [ce, ms, exact]}))
    # Per response: 5 steps, 2 sampled boundaries, 16 completions of 5 tokens against a response's 10.
    assert "| math-shepherd-hard | 5.00 | 2.00 | 16.0 | 0.50 | 12 |" in md
    assert "| math-shepherd-hard / ce-k2 | 9.0x | 16.0x | 4.5x |" in md and "reported 38.8x" in md


def test_table1_from_one_study_per_generator(tmp_path):
    """make paper's Table 1 parts side by side: each generator's header says who sampled its test
    responses, the combined table carries every part's cells and baselines, and a part whose PRMs
    were trained otherwise is named."""
    import sys
    from pathlib import Path

    from prm_ray.study.report import table1_markdown

    diff = {f"{k}@{n} - {b}": {"mean": 0.25, "interval": [0.1, 0.4]}
            for n in (1, 2, 4) for k, b in (("bon", f"majority@{n}"), ("weighted_mv", f"majority@{n}"),
                                            ("bon", f"policy likelihood bon@{n}"))}

    def part(bon, generator=None, lr=1e-4):
        iv = {k: [v - 0.05, v + 0.04] for k, v in _metrics(bon).items()}
        return {
            "study": "s", "title": "t", "axis": "objective", "headline_n": 4,
            "results": [_row("ce", bon, intervals=iv, differences=diff), _row("dpo", bon - 0.1)],
            "baseline": _metrics(0.5), "baseline_intervals": {k: [0.4, 0.6] for k in _metrics(0.5)},
            "baseline_likelihood": _metrics(0.7),
            "intervals": {"level": 0.95, "draws": 2000, "seed": 0, "method": "bootstrap"},
            "config": {"policy": "p", "train": {"lr": lr}, "eval": {"protocol": "first", "aggregation": "min",
                                                                    "vote_coef": 0.001}},
            "seeds": {"train": [0]}, "stages": [], "wall_seconds": 3.0, "policy_params": 1000,
            "test": {"problems": 2, "samples_per_problem": 4, "split": "test", "task": "arith", "generator": generator},
            "train_rollouts": {"instructions": 3, "responses": 24, "responses_per_instruction": 8, "pass@1": 0.5},
        }

    weak = part(0.6, {"name": "weaker", "policy": "runs/generators/weaker-1", "temperature": None})
    write_report(weak, tmp_path / "weaker")
    md = (tmp_path / "weaker" / "report.md").read_text()
    assert "Test responses: generator `weaker` (`runs/generators/weaker-1`) in place of the policy" in md
    assert "Generator `weaker` alone on the test problems: pass@1 50.0" in md
    assert "Test responses" not in table1_markdown({"policy": part(0.8)})  # only the parts' list

    table = table1_markdown({"policy": part(0.8), "weaker": weak}, links={"weaker": "w/report.md"}, ns=(2, 4))
    assert "| reward model | policy @2 | policy @4 | weaker @2 | weaker @4 | policy: @4 - majority | weaker: @4 - majority |" in table
    assert "| ce | 80.0 [75.0, 84.0] | 80.0 [75.0, 84.0] | 60.0 [55.0, 64.0] | 60.0 [55.0, 64.0] | +25.0 [+10.0, +40.0] | +25.0 [+10.0, +40.0] |" in table
    assert "| dpo | 70.0 | 70.0 | 50.0 | 50.0 | n/a | n/a |" in table
    assert "| majority voting | 55.0 [40.0, 60.0] | 55.0 [40.0, 60.0] | 55.0 [40.0, 60.0] | 55.0 [40.0, 60.0] |  |  |" in table
    assert "- **weaker**: `runs/generators/weaker-1`; pass@1 50.0; 2 problems x 4 ([report](w/report.md))" in table
    assert "Not the same PRMs" not in table
    other = table1_markdown({"policy": part(0.8), "weaker": part(0.6, lr=1e-3)})
    assert "**Not the same PRMs**: `weaker`'s were trained with another `train.lr` than `policy`'s." in other

    # compare_baselines' Math-Shepherd PRMs join in the columns whose test responses it scored:
    # its own test set (the policy's) and its `generators` (here `weaker`, not `stronger`); its
    # implicit rows stay out (they are Table 1's own).
    def other_responses(rep, majority):
        return {**rep, "baseline": {**rep["baseline"], **{f"majority@{n}": majority for n in (1, 2, 4)}}}

    weak, strong = other_responses(weak, 0.3), other_responses(part(0.85), 0.6)
    ms = _row("math-shepherd-hard", 0.45, objective="math-shepherd-hard", intervals={"bon@4": [0.4, 0.5]},
              differences={"bon@4 - majority@4": {"mean": -0.1, "interval": [-0.2, -0.01]}},
              generators={"weaker": {"metrics": _metrics(0.2), "differences": {}}})
    cb = {**part(0.8), "results": [_row("ce-k8", 0.9), ms, {**_row("math-shepherd-soft", 0.1),
                                                              "objective": "math-shepherd-soft", "metrics": None}],
          "generators": {"weaker": {"baseline": weak["baseline"]}, "stronger": {"baseline": _metrics(0.1)}}}
    cb["config"] = {**cb["config"], "shepherd": {"completions_per_step": 8}}
    table = table1_markdown({"policy": part(0.8), "stronger": strong, "weaker": weak}, baselines=cb,
                            baselines_link="compare_baselines/report.md")
    assert "| math-shepherd-hard | 45.0 [40.0, 50.0] | n/a | 20.0 | -10.0 [-20.0, -1.0] | n/a | n/a |" in table
    assert "ce-k8" not in table and "math-shepherd-soft |" not in table  # a row without numbers: none
    assert ("`math-shepherd-hard`: [compare_baselines](compare_baselines/report.md)'s explicit PRMs (Math-Shepherd "
            "step labels from 8 completions per step") in table
    assert "scored on the responses of `policy`, `weaker`; `n/a` where" in table and "Not the same training" not in table
    moved = {**cb, "config": {**cb["config"], "train_rollouts": {"limit": 5}}}
    assert "**Not the same training data**: compare_baselines' `train_rollouts` is not `policy`'s." in \
        table1_markdown({"policy": part(0.8)}, baselines=moved)
    assert "math-shepherd" not in table1_markdown({"stronger": strong}, baselines=cb)  # it scored none of them

    # The script: every part found under <results>/compare_objectives/, the policy's column first,
    # the configured parts not yet run named.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import paper_tables

    for d, rep in (("table1-weaker", weak), ("table1", part(0.8))):
        (tmp_path / "results" / "compare_objectives" / d).mkdir(parents=True)
        (tmp_path / "results" / "compare_objectives" / d / "report.json").write_text(json.dumps(rep))
    (tmp_path / "results" / "compare_baselines").mkdir()
    (tmp_path / "results" / "compare_baselines" / "report.json").write_text(json.dumps(cb))
    out, = paper_tables.main(["--results", str(tmp_path / "results")])  # no Figure 4 parts: no figure
    text = out.read_text()
    assert "| math-shepherd-hard | 45.0 [40.0, 50.0] | 20.0 | -10.0 [-20.0, -1.0] | n/a |" in text
    assert "[compare_baselines](compare_baselines/report.md)" in text
    assert "| reward model | policy @4 | weaker @4 | policy: @4 - majority | weaker: @4 - majority |" in text
    assert "([report](compare_objectives/table1-weaker/report.md))" in text
    assert "Not yet run: `compare_objectives/table1-stronger`" in text


def test_figure4_from_parts_that_share_their_test_responses(tmp_path):
    """make paper's scale_instructions parts: rows of both, ordered along the axis, with their own
    intervals and differences; parts that sampled other test responses are refused, naming them."""
    import sys
    from pathlib import Path

    from prm_ray.study.report import merge_parts

    def row(f, bon):
        return {**_row(f"ce-f{int(100 * f)}", bon), "instruction_fraction": f,
                "axis": {"instruction_fraction": f, "series": "ce"},
                "intervals": {k: [v - 0.05, v + 0.04] for k, v in _metrics(bon).items()},
                "differences": {f"{k}@{n} - {b}": {"mean": bon - 0.55, "interval": [bon - 0.6, bon - 0.5]}
                                for n in (1, 2, 4) for k, b in (("bon", f"majority@{n}"), ("weighted_mv", f"majority@{n}"),
                                                                ("bon", f"policy likelihood bon@{n}"))}}

    def part(rows, majority=0.55):
        base = {**_metrics(0.5), **{f"majority@{n}": majority for n in (1, 2, 4)}}
        return {"study": "s", "title": "Figure 4", "axis": "instruction_fraction", "headline_n": 4, "results": rows,
                "baseline": base, "baseline_likelihood": _metrics(0.7),
                "intervals": {"level": 0.95, "draws": 2000, "seed": 0, "method": "bootstrap"},
                "config": {"policy": "p"}, "stages": [{"stage": "x", "wall_s": 1.0, "reused": False}],
                "test": {"problems": 2, "samples_per_problem": 4, "split": "test", "task": "arith"}}

    # The 8k part repeats 1k-4k's first row (reused there) to pair its own row against it.
    along = {"8k": {"ce-f100 - ce-f12": {f"bon@{n}": {"mean": 0.3, "interval": [0.1, 0.5]} for n in (2, 4)}},
             "1k-4k": {"ce-f50 - ce-f12": {f"bon@{n}": {"mean": 0.2, "interval": [-0.1, 0.5]} for n in (2, 4)}}}
    parts = {"8k": {**part([row(1.0, 0.9), row(0.125, 0.6)]), "axis_differences": along["8k"]},
             "1k-4k": {**part([row(0.5, 0.8), row(0.125, 0.6)]), "axis_differences": along["1k-4k"]}}
    md = merge_parts(parts, tmp_path / "fig", links={"8k": "a/report.md"})
    table = md.split("## Best-of-N")[1]
    assert table.index("| ce-f12 |") < table.index("| ce-f50 |") < table.index("| ce-f100 |")
    assert table.count("| ce-f12 |") == 4  # once in best-of-N and in each of its three differences tables
    assert "| ce-f100 - ce-f12 | +30.0 [+10.0, +50.0] | +30.0 [+10.0, +50.0] |" in md
    assert "| ce-f50 - ce-f12 | +20.0 [-10.0, +50.0] |" in md
    with pytest.raises(ValueError, match="row ce-f12 differs between parts 8k and 1k-4k"):
        merge_parts({"8k": part([row(0.125, 0.6)]), "1k-4k": part([row(0.125, 0.65)])}, tmp_path / "bad")
    assert "| ce-f100 | 90.0 [85.0, 94.0] | 90.0 [85.0, 94.0] | 90.0 [85.0, 94.0] |" in table
    assert "| ce-f12 | +5.0 [+0.0, +10.0] |" in table  # its paired difference, from its own part
    assert "Parts: [8k](a/report.md), 1k-4k." in md
    for png in ("scaling.png", "bon_vs_n.png", "differences.png"):
        assert (tmp_path / "fig" / png).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "fig" / "stages.png").exists()  # each part has its own
    # The paper's axis: instructions, doublings evenly spaced (log 2), labelled by their count.
    from prm_ray.study.report import scaling_figure

    merged = {**parts["1k-4k"], "results": parts["1k-4k"]["results"] + parts["8k"]["results"][:1],
              "train_rollouts": {"instructions": 8000}}
    ax = scaling_figure(merged).axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1,000", "4,000", "8,000"]
    assert ax.get_xlabel() == "training instructions (of 8,000)"
    [bars] = ax.containers
    assert bars.get_label() == "ce" and list(bars.lines[0].get_xdata()) == [0.125, 0.5, 1.0]
    with pytest.raises(ValueError, match="1k-4k has other test responses than 8k"):
        merge_parts({"8k": part([row(1.0, 0.9)]), "1k-4k": part([row(0.5, 0.8)], majority=0.6)}, tmp_path / "bad")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import paper_tables

    for name, rep in parts.items():
        (tmp_path / "results" / "scale_instructions" / name).mkdir(parents=True)
        (tmp_path / "results" / "scale_instructions" / name / "report.json").write_text(json.dumps(rep))
    [out] = paper_tables.main(["--results", str(tmp_path / "results")])  # no Table 1 parts: no table
    assert out == tmp_path / "results" / "figure4" / "report.md"
    assert "Parts: [1k-4k](../scale_instructions/1k-4k/report.md), [8k](../scale_instructions/8k/report.md)." in out.read_text()
    assert "Not yet run" not in out.read_text()
