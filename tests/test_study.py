"""A tiny end-to-end scale_responses study: rollouts -> PRMs -> evaluation -> report, then reuse."""

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import tiny_study as _tiny

from prm_ray.config import ConfigError, from_dict, to_dict
from prm_ray.study import (
    CompareBaselinesConfig,
    CompareObjectivesConfig,
    PRMSpec,
    ScaleInstructionsConfig,
    ScaleResponsesConfig,
    compare_baselines_specs,
    compare_objectives_specs,
    run_study,
    scale_instructions_specs,
    scale_responses_specs,
    train_config,
)
from prm_ray.study.specs import reference_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))


def test_study_configs_keep_their_own_nested_defaults():
    cfg = from_dict(ScaleResponsesConfig, {"test_rollouts": {"limit": 5}})
    assert cfg.test_rollouts.split == "test" and cfg.test_rollouts.sampling.n == 64
    assert cfg.test_rollouts.limit == 5 and cfg.train_rollouts.sampling.n == 8
    with pytest.raises(ConfigError, match="responses"):
        from_dict(ScaleResponsesConfig, {"responses": [1, 16]})
    with pytest.raises(ConfigError, match="held-out"):
        from_dict(ScaleResponsesConfig, {"test_rollouts": {"split": "train"}})
    with pytest.raises(ConfigError, match="objectives"):
        from_dict(CompareObjectivesConfig, {"objectives": ["ce", "ppo"]})
    # What each row sets (train_config) is refused in the study's `train`, not overwritten silently.
    for train, field_ in (({"dataset": {"instruction_fraction": 0.5}}, "train.dataset.instruction_fraction"),
                          ({"dataset": {"objective": "dpo"}}, "train.dataset.objective"), ({"seed": 3}, "train.seed")):
        with pytest.raises(ConfigError, match=f"{field_}: a study sets it per row"):
            from_dict(CompareObjectivesConfig, {"train": train})


def test_a_math_shepherd_row_outside_compare_baselines_is_refused_before_any_work(tmp_path):
    """Only compare_baselines has the `shepherd` section its step labels need; elsewhere such a row
    used to crash mid-study on `cfg.shepherd`."""
    for cls in (ScaleResponsesConfig, ScaleInstructionsConfig):
        with pytest.raises(ConfigError, match="objectives.*math-shepherd-hard.*compare_baselines"):
            from_dict(cls, {"objectives": ["ce", "math-shepherd-hard"]})
    spec = PRMSpec("math-shepherd-hard", objective="math-shepherd-hard")
    with pytest.raises(ConfigError, match="math-shepherd-hard.*shepherd.*ScaleResponsesConfig"):
        run_study(ScaleResponsesConfig(runs_dir=str(tmp_path)), [spec], axis_name="k", title="t")
    assert not any(tmp_path.iterdir())


def test_grids():
    specs = scale_responses_specs(ScaleResponsesConfig())
    assert [s.name for s in specs] == ["ce-k1", "ce-k2", "ce-k4", "ce-k8", "dpo-k1", "dpo-k2", "dpo-k4", "dpo-k8"]
    assert [s.name for s in specs if s.undefined] == ["dpo-k1"]
    assert [s.instruction_fraction for s in scale_instructions_specs(ScaleInstructionsConfig())] == [0.25, 0.5, 0.75, 1.0]
    cmp = compare_objectives_specs(CompareObjectivesConfig())
    assert [(s.objective, s.balance) for s in cmp[:6]] == [("ce", "none"), ("ce", "dataset"), ("ce", "instruction"),
                                                           ("dpo", "none"), ("kto", "none"), ("nca", "none")]
    assert {(s.reference_train, s.reference_infer) for s in cmp[6:]} == {(True, True), (True, False), (False, True)}
    base = compare_baselines_specs(from_dict(CompareBaselinesConfig, {"shepherd_lr": 1e-3}))
    assert [s.name for s in base] == ["ce-k2", "ce-k8", "dpo-k2", "dpo-k8", "math-shepherd-hard", "math-shepherd-soft"]
    assert [s.train_overrides for s in base] == [{}] * 4 + [{"lr": 1e-3, "epochs": 3}] * 2
    assert [s.uses_reference(CompareBaselinesConfig()) for s in base[4:]] == [(False, False)] * 2
    cfg = CompareBaselinesConfig()
    ms, ce = train_config(cfg, base[4], Path("labels")), train_config(cfg, base[0], Path("rollouts"))
    assert (ms.lr, ms.epochs, ce.lr, ce.epochs) == (1e-3, 3, cfg.train.lr, cfg.train.epochs) and ms.out != ce.out
    # A row on all responses is keyed as k = n: compare_objectives' ce is scale_responses' ce-k8.
    sr = ScaleResponsesConfig()
    ce_k8 = train_config(sr, scale_responses_specs(sr)[3], Path("rollouts"))
    co = CompareObjectivesConfig()
    assert train_config(co, compare_objectives_specs(co)[0], Path("rollouts")).out == ce_k8.out
    assert ce_k8.dataset.responses_per_instruction == 8 and ms.dataset.responses_per_instruction is None
    base[0].train_overrides = {"dataset": {}}
    with pytest.raises(ConfigError, match="train_overrides"):
        train_config(cfg, base[0], Path("rollouts"))


def test_a_prm_model_other_than_the_policy_is_every_prms_start_and_reference():
    """prm_model (e.g. a PRM larger than the generator): every PRM starts from it, and it is the
    implicit reward's reference and the likelihood baseline's model unless reference_model names one."""
    from prm_ray.study.report import likelihood_name

    base = ScaleResponsesConfig()
    big = from_dict(ScaleResponsesConfig, {"prm_model": "artifacts/big"})
    spec = scale_responses_specs(big)[3]
    assert (base.prm_base, base.reference) == ("artifacts/policy", "artifacts/policy")
    assert (big.prm_base, big.reference) == ("artifacts/big", "artifacts/big")
    tc = train_config(big, spec, Path("rollouts"))
    assert (tc.model, tc.reference_model) == ("artifacts/big", None)  # None: the reference is the model itself
    assert tc.out != train_config(base, spec, Path("rollouts")).out
    assert reference_dir(big, Path("r"), "bfloat16") != reference_dir(base, Path("r"), "bfloat16")
    named = from_dict(ScaleResponsesConfig, {"prm_model": "artifacts/big", "reference_model": "artifacts/ref"})
    assert named.reference == "artifacts/ref" and train_config(named, spec, Path("r")).reference_model == "artifacts/ref"
    assert likelihood_name({"config": to_dict(base), "likelihood_model": base.reference}) == "policy log-likelihood"
    assert likelihood_name({"config": to_dict(big), "likelihood_model": big.reference}) == \
        "reference log-likelihood (big)"
    assert likelihood_name({"config": to_dict(base)}) == "policy log-likelihood"  # a report from before the field


def test_train_variants_add_a_row_per_objective_and_setting():
    """A sweep of training settings: each variant trains every objective once more, into its own
    PRM directory, with only the named fields changed; bad variants are refused naming the field."""
    cfg = from_dict(CompareObjectivesConfig, {"objectives": ["ce", "ce-dataset"], "reference_ablation": False,
                                              "train_variants": {"b0.5": {"beta": 0.5}, "ep3": {"epochs": 3}}})
    specs = compare_objectives_specs(cfg)
    assert [(s.name, s.objective, s.balance) for s in specs] == [
        ("ce", "ce", "none"), ("ce-dataset", "ce", "dataset"), ("ce-b0.5", "ce", "none"),
        ("ce-dataset-b0.5", "ce", "dataset"), ("ce-ep3", "ce", "none"), ("ce-dataset-ep3", "ce", "dataset")]
    tcs = [train_config(cfg, s, Path("rollouts")) for s in specs]
    b = cfg.train.beta
    assert b != 0.5 and [(t.beta, t.epochs) for t in tcs] == [(b, 1)] * 2 + [(0.5, 1)] * 2 + [(b, 3)] * 2
    assert len({t.out for t in tcs}) == 6 and tcs[0].lr == tcs[2].lr == tcs[4].lr
    for bad, field_ in (({"a b": {"beta": 1}}, "name 'a b'"), ({"v": {}}, "train_variants.v"),
                        ({"v": {"seed": 3}}, "seed"), ({"v": {"betta": 3}}, "betta")):
        with pytest.raises(ConfigError, match=field_):
            from_dict(CompareObjectivesConfig, {"train_variants": bad})


@pytest.fixture(scope="module")
def shared_runs(study_runs, tiny_train_rollouts):
    """The session's runs_dir: compare_baselines reuses scale_responses' rollouts and PRM, and both
    reuse the training rollouts the training tests made."""
    return study_runs


def test_scale_responses_end_to_end(tiny_trained_policy, ray_session, shared_runs, tmp_path):
    import scale_responses

    cfg = {**_tiny(tiny_trained_policy[0].out, shared_runs), "seeds": [0, 1]}
    argv = ["--config", str(tmp_path / "cfg.json")]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))  # JSON is YAML
    report = scale_responses.main(argv)
    run = shared_runs / "scale_responses"
    for f in ("report.md", "report.json", "bon_vs_n.png", "scaling.png", "stages.png", "config.yaml"):
        assert (run / f).stat().st_size > 0, f
    saved = json.loads((run / "report.json").read_text())
    by = {r["name"]: r for r in saved["results"]}
    assert set(by) == {"ce-k4", "dpo-k4"}  # (DPO at k=1, undefined, is checked in test_grids)
    keys = {f"{k}@{n}" for k in ("pass", "majority", "bon", "weighted_mv") for n in (1, 2, 4, 8)} | {"pass@1_first"}
    for name in ("ce-k4", "dpo-k4"):
        r = by[name]
        assert r["objective"] == name.split("-")[0] and r["reference"] is True
        assert r["responses_per_instruction"] == int(name[-1])
        assert set(r["metrics"]) == set(r["intervals"]) == set(r["by_seed"]) == keys
        # Two training seeds, two PRMs; the row's numbers are the mean of the seeds' own evaluations
        # (each seed's metrics.json), inside their interval.
        assert r["seeds"] == [0, 1] and [x["seed"] for x in r["runs"]] == [0, 1]
        assert r["runs"][0]["prm"] != r["runs"][1]["prm"]
        for k in keys:
            assert r["by_seed"][k] == pytest.approx([x["metrics"][k] for x in r["runs"]])
            assert r["metrics"][k] == pytest.approx(sum(r["by_seed"][k]) / 2)
            lo, hi = r["intervals"][k]
            assert 0.0 <= lo <= r["metrics"][k] + 1e-12 and r["metrics"][k] - 1e-12 <= hi <= 1.0
        d = r["differences"]["bon@4 - majority@4"]
        assert d["mean"] == pytest.approx(r["metrics"]["bon@4"] - saved["baseline"]["majority@4"])
        # The same scores under the other aggregations; `min` again is the row's own best-of-N.
        agg = r["aggregations"]
        assert list(agg) == ["min", "sum", "mean", "last"]
        assert agg["min"]["metrics"] == pytest.approx({k: v for k, v in r["metrics"].items() if k.startswith("bon@")})
        assert d["interval"][0] <= d["mean"] + 1e-12 <= d["interval"][1] + 2e-12
    # The policy-only numbers agree with the rollouts themselves.
    base = saved["baseline"]
    assert base["pass@1"] == pytest.approx(saved["stages"][2]["pass@1"])
    assert base["pass@8"] == pytest.approx(saved["stages"][2]["pass@N"])
    assert saved["baseline_intervals"]["pass@1"][0] <= base["pass@1"] <= saved["baseline_intervals"]["pass@1"][1]
    # Every best-of-N number in report.md is the one in report.json, with its interval.
    md = (run / "report.md").read_text()
    for name in ("ce-k4", "dpo-k4"):
        row = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", md, re.M).group(1).split(" | ")
        m, iv = by[name]["metrics"], by[name]["intervals"]
        assert row == [f"{100 * m[f'bon@{n}']:.1f} [{100 * iv[f'bon@{n}'][0]:.1f}, {100 * iv[f'bon@{n}'][1]:.1f}]"
                       for n in (1, 2, 4, 8)]
        diff = by[name]["differences"]["bon@4 - majority@4"]
        lo, hi = diff["interval"]
        assert f"{100 * diff['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] vs majority@4" in md
    lik = saved["baseline_likelihood"]
    assert set(lik) == set(base) and lik["pass@1"] == base["pass@1"]
    d = saved["baseline_likelihood_differences"]["bon@4 - majority@4"]
    assert d["mean"] == pytest.approx(lik["bon@4"] - base["majority@4"])
    # The step-level table: every PRM and both baselines, thresholds from the validation split
    # (one per seed), report.md's numbers those of report.json.
    sl = saved["step_level"]
    assert sl["labels"]["responses"] == 8 * 8 and sl["validation"] == {"problems": 6, "samples_per_problem": 4}
    assert sl["labels"]["with_error"] + sl["labels"]["without_error"] == 64
    assert set(sl["baselines"]) == {"policy log-likelihood", "random"}
    step_md = md.split("## Step level")[1].split("## Weighted")[0]
    rows = {**{name: by[name]["step_level"] for name in by}, **{f"{n} (no PRM)": m for n, m in sl["baselines"].items()}}
    for name, m in rows.items():
        assert m["threshold_from"] == "validation" and m["with_error"] == sl["labels"]["with_error"]
        assert len(m["by_seed"]["threshold"]) == (1 if "no PRM" in name else 2)
        got = re.search(rf"^\| {re.escape(name)} \| (.*) \|$", step_md, re.M).group(1).split(" | ")

        def cell(k, m=m):
            iv = m["intervals"].get(k)
            return "-" if m[k] is None else f"{100 * m[k]:.1f}" + (
                f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]" if iv else "")

        assert got == [cell(k) for k in ("f1", "error_accuracy", "correct_accuracy", "step_auc")] + [
            " / ".join(f"{t:.4g}" for t in m["by_seed"]["threshold"])]
    agg_md = md.split("by aggregation of the step rewards")[1].split("\n## ")[0]
    for name in ("ce-k4", "dpo-k4"):
        a = by[name]["aggregations"]["sum"]
        assert f"{100 * a['metrics']['bon@4']:.1f} [{100 * a['intervals']['bon@4'][0]:.1f}, " in \
            re.search(rf"^\| {re.escape(name)} \| (.*) \|$", agg_md, re.M).group(1)
    for f in ("step_rewards.png", "f1_threshold.png", "step_curves.json"):
        assert (run / f).stat().st_size > 0, f
    assert {s["stage"] for s in saved["stages"]} >= {"train rollouts", "test rollouts", "train ce-k4 (seed 0)",
                                                    "train ce-k4 (seed 1)", "eval dpo-k4 (seed 1)",
                                                    "validation rollouts", "eval ce-k4 (validation, seed 1)"}
    assert report["results"] == saved["results"]

    # Submitting again reuses every stage and gives the same numbers.
    again = scale_responses.main(argv)
    assert all(s["reused"] for s in again["stages"]), again["stages"]
    assert [(r["metrics"], r["intervals"]) for r in again["results"]] == \
        [(r["metrics"], r["intervals"]) for r in saved["results"]]
    # ... and still reports what each stage cost when it was made (a resumed study's wall times).
    made = {s["stage"]: s.get("made_wall_s") for s in again["stages"]}
    assert all(v is not None and v > 0 for k, v in made.items() if k != "policy"), made  # the shipped policy: none
    for s in saved["stages"]:
        if not s["reused"] and s["stage"].startswith(("train ", "eval ")) and s["stage"] != "train rollouts":
            assert made[s["stage"]] == pytest.approx(s["wall_s"]), s["stage"]
    assert "| wall s this run | reused | wall s made |" in (run / "report.md").read_text()


def test_compare_baselines_end_to_end_with_compute(tiny_trained_policy, ray_session, shared_runs, tmp_path):
    """The implicit PRM and a Math-Shepherd PRM on the same rollouts, with FLOPs per stage that
    match the datasets they describe (runs after scale_responses and reuses its rollouts and PRM)."""
    import compare_baselines
    import pyarrow.dataset as pads
    import yaml
    from transformers import AutoTokenizer

    from prm_ray.models import count_parameters
    from prm_ray.tokens import prompt_token_counts

    policy = tiny_trained_policy[0].out
    # A second generator (paper Table 1): the same policy sampled hotter, reranked by every PRM.
    cfg = {**_tiny(policy, shared_runs), "objectives": ["ce"], "shepherd_labels": ["hard", "exact"],
           "shepherd": {"completions_per_step": 2, "responses_per_instruction": 2, "shard_size": 32},
           "generators": [{"name": "hot", "temperature": 1.5}]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    report = compare_baselines.main(["--config", str(tmp_path / "cfg.json")])
    run = shared_runs / "compare_baselines"
    for f in ("report.md", "report.json", "accuracy_vs_flops.png", "cost.png"):
        assert (run / f).stat().st_size > 0, f
    by = {r["name"]: r for r in report["results"]}
    assert set(by) == {"ce-k4", "math-shepherd-hard", "math-shepherd-exact"}
    # The exact-label row trains the same objective on the step checker's labels of the same
    # responses: no completions, so no cost ratio (it bounds Math-Shepherd's accuracy, not its cost).
    exact = by["math-shepherd-exact"]
    assert exact["label_method"] == "exact" and exact["objective"] == "math-shepherd-hard"
    assert exact["compute"]["stages"]["step-label completions"]["flops"] == 0
    assert exact["compute"]["stages"]["generation"]["responses"] == 48 * 2
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["Math-Shepherd step labels (exact)"]["generated_tokens"] == 0
    assert stages["train ce-k4 (seed 0)"]["reused"]  # trained by the scale_responses study above
    # ... and scored there: evaluations are shared across studies by (PRM, data, eval config).
    assert stages["eval ce-k4 (seed 0)"]["reused"] and stages["eval ce-k4 (validation, seed 0)"]["reused"]
    assert by["ce-k4"]["runs"][0]["eval_dir"].startswith(str(shared_runs / "evals" / "ce-k4-"))
    assert not stages["eval ce-k4 (seed 0, generator hot)"]["reused"]
    ms, ce = by["math-shepherd-hard"], by["ce-k4"]
    assert ms["reference"] is False and ms["reference_at_inference"] is False and ms["responses_per_instruction"] == 2
    assert set(ms["metrics"]) == set(ce["metrics"])
    assert list(ms["aggregations"]) == ["min", "prod", "last", "mean"] and "sum" not in ms["aggregations"]
    assert ms["aggregations"]["min"]["metrics"]["bon@4"] == pytest.approx(ms["metrics"]["bon@4"])

    params = count_parameters(policy)
    tok = AutoTokenizer.from_pretrained(policy)
    roll = pads.dataset(str(next((shared_runs / "rollouts").glob("train-*")) / "data")).to_table().to_pylist()
    [mc] = [d for d in (shared_runs / "shepherd").glob("*")
            if yaml.safe_load((d / "config.yaml").read_text())["method"] == "monte_carlo"]
    labels = pads.dataset(str(mc / "data")).to_table().to_pylist()

    def tokens(rows):
        return sum(prompt_token_counts(tok, [r["prompt"] for r in rows])) + sum(r["num_tokens"] for r in rows)

    c = ce["compute"]["stages"]
    assert c["generation"]["responses"] == len(roll) == 48 * 4  # k = 4 of 4
    assert c["generation"]["prompt_tokens"] + c["generation"]["generated_tokens"] == tokens(roll)
    assert c["generation"]["flops"] == 2 * params * tokens(roll)
    assert c["reference log-probs"]["flops"] == 2 * params * tokens(roll)  # trained with the reference here
    assert c["training"]["flops"] == 6 * params * c["training"]["tokens"] > 0
    m = ms["compute"]["stages"]
    assert len(labels) == m["generation"]["responses"] == 48 * 2 and "reference log-probs" not in m
    assert m["generation"]["prompt_tokens"] + m["generation"]["generated_tokens"] == tokens(labels)
    done = m["step-label completions"]
    assert done["prompt_tokens"] == sum(r["completion_prompt_tokens"] for r in labels)
    assert done["generated_tokens"] == sum(r["completion_generated_tokens"] for r in labels)
    assert done["completions"] == sum(2 * (len(r["steps"]) - 1) for r in labels)
    assert done["flops"] == 2 * params * (done["prompt_tokens"] + done["generated_tokens"])
    for r in (ce, ms):
        comp = r["compute"]
        assert comp["total_flops"] == pytest.approx(sum(s["flops"] for s in comp["stages"].values()))
        assert comp["build_flops"] == pytest.approx(comp["total_flops"] - comp["stages"]["scoring"]["flops"])
    ratio = ms["compute"]["build_flops"] / ce["compute"]["build_flops"]
    md = (run / "report.md").read_text()
    assert f"**math-shepherd-hard** costs **{ratio:.1f}x** the build FLOPs of **ce-k4**" in md
    assert "**math-shepherd-exact** costs" not in md

    # Every row reranks the hot generator's responses of the same problems, with its own baselines.
    hot = report["generators"]["hot"]
    assert hot["temperature"] == 1.5 and hot["policy"] == str(Path(policy).resolve())
    assert 0 <= hot["pass@1"] <= 1 and hot["baseline"]["pass@1"] == pytest.approx(hot["pass@1"])
    assert stages["test rollouts (hot)"]["instructions"] == 8
    for r in (ce, ms):
        g = r["generators"]["hot"]
        assert set(g["metrics"]) == set(r["metrics"]) and g["by_seed"]["bon@4"] == [pytest.approx(g["metrics"]["bon@4"])]
        table = md.split("### hot")[1].split("\n\n")[1]
        lo, hi = g["intervals"]["bon@4"]
        assert f"| {r['name']} | " in table and f"{100 * g['metrics']['bon@4']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" in table

    again = compare_baselines.main(["--config", str(tmp_path / "cfg.json")])
    assert all(s["reused"] for s in again["stages"]), again["stages"]
    assert [r["compute"]["total_flops"] for r in again["results"]] == [r["compute"]["total_flops"] for r in report["results"]]

    # One generator per study (make paper's Table 1 parts): the hot generator as the test set
    # reuses its rollouts and the PRM, and reproduces the hot column above.
    import scale_responses
    col = {**_tiny(policy, shared_runs), "name": "hot_column", "objectives": ["ce"],
           "test_generator": {"name": "hot", "temperature": 1.5}}
    (tmp_path / "col.json").write_text(json.dumps(col))
    alone = scale_responses.main(["--config", str(tmp_path / "col.json")])
    st = {s["stage"]: s for s in alone["stages"]}
    assert "test rollouts" not in st and st["test rollouts (hot)"]["reused"] and st["train ce-k4 (seed 0)"]["reused"]
    assert st["eval ce-k4 (seed 0)"]["reused"]  # compare_baselines scored the hot responses with this PRM
    assert alone["test"]["generator"] == {"name": "hot", "policy": hot["policy"], "temperature": 1.5}
    assert alone["baseline"] == pytest.approx(hot["baseline"])
    assert alone["baseline_likelihood"] == pytest.approx(hot["baseline_likelihood"])
    [row] = alone["results"]
    assert row["metrics"] == pytest.approx(ce["generators"]["hot"]["metrics"])
    md = (shared_runs / "hot_column" / "report.md").read_text()
    assert "Test responses: generator `hot`" in md and "Generator `hot` alone on the test problems" in md


def test_a_generator_without_a_model_is_bootstrapped_with_the_studys_recipe_changed(tiny_trained_policy, tmp_path):
    """Table 1's weaker generator: the study's bootstrap config with the generator's changes,
    trained into the runs directory (or its own `policy` directory), and reused the next time."""
    from prm_ray.config import to_dict
    from prm_ray.study.runner import generator_policy

    recipe = to_dict(tiny_trained_policy[0])
    recipe.pop("out")
    cfg = from_dict(ScaleResponsesConfig, {
        "runs_dir": str(tmp_path), "bootstrap": recipe,
        "generators": [{"name": "weak", "bootstrap": {"steps": 5}},
                       {"name": "mine", "policy": str(tmp_path / "mine"), "bootstrap": {"steps": 4}},
                       {"name": "given", "policy": tiny_trained_policy[0].out}]})
    weak, mine, given = cfg.generators
    policy, records = generator_policy(cfg, weak, print)
    settings = json.loads((Path(policy) / "bootstrap_settings.json").read_text())
    assert Path(policy).parent == tmp_path / "generators" and Path(policy).name.startswith("weak-")
    assert settings["steps"] == 5 and settings["model"] == recipe["model"] and settings["arith"] == recipe["arith"]
    assert [r.stage for r in records] == ["policy (weak)"] and not records[0].reused
    again, records = generator_policy(cfg, weak, print)
    assert again == policy and records[0].reused
    policy, _ = generator_policy(cfg, mine, print)
    assert policy == str(tmp_path / "mine") and json.loads((tmp_path / "mine" / "bootstrap_settings.json").read_text())["steps"] == 4
    assert generator_policy(cfg, mine, print)[1] == []  # it has a model now
    assert generator_policy(cfg, given, print) == (tiny_trained_policy[0].out, [])
    with pytest.raises(ConfigError, match="neither a policy, a bootstrap nor a temperature"):
        from_dict(ScaleResponsesConfig, {"generators": [{"name": "same"}]})
    with pytest.raises(ConfigError, match="distinct"):
        from_dict(ScaleResponsesConfig, {"generators": [{"name": "policy", "temperature": 1.0}]})
    with pytest.raises(ConfigError, match="distinct"):
        from_dict(ScaleResponsesConfig, {"generators": [{"name": "hot", "temperature": 1.0}],
                                         "test_generator": {"name": "hot", "temperature": 1.5}})


def test_overwriting_a_study_empties_its_directory_and_without_overwrite_names_the_field(tmp_path):
    """Another config replaces the report, plots and settings (the evaluations live in the shared
    ``<runs_dir>/evals/``); without overwrite the directory is refused, naming the field."""
    from prm_ray.study.runner import claim_study_dir

    run = tmp_path / "study"
    for f in ("study_settings.json", "report.md", "bon_vs_n.png"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_text("{\"config\": {\"seeds\": [0]}}" if f == "study_settings.json" else "x")
    claim_study_dir(run, {"config": {"seeds": [0]}}, False)  # the same config: nothing to do
    assert (run / "report.md").exists()
    with pytest.raises(ConfigError, match="seeds"):
        claim_study_dir(run, {"config": {"seeds": [0, 1]}}, False)
    claim_study_dir(run, {"config": {"seeds": [0, 1]}}, True)
    assert list(run.iterdir()) == []


def test_evaluations_kept_in_study_directories_move_to_their_shared_place(tmp_path):
    """Evaluations made before they were shared move, by the key in their metrics.json, to where
    any study now looks for them; a second study's copy of the same evaluation is a duplicate,
    an unfinished one stays, and the emptied study directories go."""
    from prm_ray.study.runner import adopt_study_evaluations
    from prm_ray.study.specs import eval_dir

    def made(where: Path, prm: str, data: str, seeds: int = 16) -> dict:
        key = {"prm": str(tmp_path / "prms" / prm), "data": str(tmp_path / "rollouts" / data), "beta": 0.05,
               "config": {"ns": [seeds], "aggregation": "min"}}
        (where / "scores").mkdir(parents=True)
        (where / "scores" / "part-0.parquet").write_text(prm + data)
        (where / "metrics.json").write_text(json.dumps({"key": key, "metrics": {}}))
        return key

    a = made(tmp_path / "table1" / "eval" / "ce" / "seed-0", "ce-k8-aa", "test-11")
    b = made(tmp_path / "table1-hot" / "eval" / "ce" / "seed-0", "ce-k8-aa", "test-22")
    dup = made(tmp_path / "baselines" / "eval-generators" / "hot" / "ce-k8" / "seed-0", "ce-k8-aa", "test-22")
    c = made(tmp_path / "table1" / "eval-validation" / "ce" / "seed-0", "ce-k8-aa", "validation-33/ref-logprobs-x")
    (tmp_path / "table1" / "eval" / "dpo" / "seed-0" / "scores").mkdir(parents=True)  # unfinished
    (tmp_path / "table1" / "eval" / "dpo" / "seed-0" / "scores" / "part-0.parquet").write_text("x")
    (tmp_path / "table1" / "report.md").write_text("x")
    logs = []
    assert adopt_study_evaluations(tmp_path, logs.append) == 3
    assert logs == [f"evaluations: 3 moved from study directories to {tmp_path / 'evals'} (shared across studies), "
                    "1 duplicates removed"]
    for key, data in ((a, "test-11"), (b, "test-22"), (c, "validation-33/ref-logprobs-x")):
        dest = eval_dir(tmp_path, key["prm"], key["data"], key["config"])
        assert dest.parent == tmp_path / "evals" / "ce-k8-aa" and dest.name.startswith(data.split("/")[0] + "-")
        assert json.loads((dest / "metrics.json").read_text())["key"] == key
        assert (dest / "scores" / "part-0.parquet").read_text() == "ce-k8-aa" + data
    assert dup == b and len({eval_dir(tmp_path, k["prm"], k["data"], k["config"]) for k in (a, b, c)}) == 3
    assert eval_dir(tmp_path, a["prm"], a["data"], {**a["config"], "ns": [4]}) != eval_dir(tmp_path, a["prm"], a["data"], a["config"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/eval*/**/*")) == [
        "table1/eval/dpo", "table1/eval/dpo/seed-0", "table1/eval/dpo/seed-0/scores",
        "table1/eval/dpo/seed-0/scores/part-0.parquet"]
    assert not (tmp_path / "baselines" / "eval-generators").exists() and (tmp_path / "table1" / "report.md").exists()
    assert adopt_study_evaluations(tmp_path, logs.append) == 0 and len(logs) == 1


def test_differences_along_the_axis_are_paired_and_per_series():
    """Each row minus the first defined row of its series (paired: a constant shift on every
    problem is exactly that shift); undefined rows and non-numeric axes have none, and rows
    scored on other problems are refused."""
    import numpy as np

    from prm_ray.core.stats import Bootstrap
    from prm_ray.study.runner import Row, SeedRun, axis_differences

    rng = np.random.default_rng(0)
    problems = [f"p{i}" for i in range(40)]
    base = [rng.integers(0, 2, 40).astype(float)]  # one seed: only the problems are resampled

    def row(name, k, shift, series="ce", ids=problems):
        runs = [SeedRun({}, [], {"bon@2": np.clip(b + shift, 0, 2), "bon@4": b + shift, "pass@1": b}, ids, None)
                for b in base] if shift is not None else []
        return Row({"name": name, "objective": series, "axis": {"k": k, "series": series}}, runs)

    rows = [row("ce-k8", 8, 0.25), row("ce-k2", 2, 0.0), row("ce-k4", 4, 0.125),
            row("dpo-k1", 1, None, "dpo"), row("dpo-k2", 2, 0.0, "dpo"), row("dpo-k4", 4, 0.5, "dpo")]
    out = axis_differences(Bootstrap(40, draws=300), rows, "k")
    assert list(out) == ["ce-k4 - ce-k2", "ce-k8 - ce-k2", "dpo-k4 - dpo-k2"]
    d = out["ce-k8 - ce-k2"]["bon@4"]
    assert set(out["ce-k8 - ce-k2"]) == {"bon@2", "bon@4"}
    assert d["mean"] == pytest.approx(0.25)
    assert d["interval"] == pytest.approx([0.25, 0.25])  # paired: the same problems on both sides
    assert out["dpo-k4 - dpo-k2"]["bon@4"]["mean"] == pytest.approx(0.5)
    assert axis_differences(Bootstrap(40, draws=10), rows, "objective") == {}
    with pytest.raises(ValueError, match="ce-k4 and ce-k2 were scored on other problems"):
        axis_differences(Bootstrap(40, draws=10), [row("ce-k2", 2, 0.0), row("ce-k4", 4, 0.0, ids=problems[::-1])], "k")
