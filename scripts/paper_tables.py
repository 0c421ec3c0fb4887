"""The paper's tables and figures that `make paper` runs in parts, put together:
Table 1 (<results>/table1.md): every <results>/compare_objectives/table1*/report.json found, one
column group per generator, with <results>/compare_baselines/report.json's Math-Shepherd PRMs in
the columns whose test responses it scored; Figure 4 (<results>/figure4/): the rows of every
<results>/scale_instructions/*/report.json. Parts configured in configs/paper/ but not yet run are
named.

    python scripts/paper_tables.py [--results docs/results/paper]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prm_ray.study.report import merge_parts, table1_markdown

ROOT = Path(__file__).resolve().parents[1]


def _todo(study: str, done: set[str], prefix: str = "") -> str:
    """The parts of ``study`` configured under configs/paper/ and not in ``done``, as a sentence."""
    todo = [p.stem for p in sorted((ROOT / "configs" / "paper" / study).glob(f"{prefix}*.yaml")) if p.stem not in done]
    if not todo:
        return ""
    return ("\nNot yet run: " + ", ".join(f"`{study}/{t}`" for t in todo)
            + f" (`make paper PAPER_STUDIES={study}/<part>`).\n")


def figure4(results: Path) -> Path | None:
    parts = {p.parent.name: json.loads(p.read_text())
             for p in sorted((results / "scale_instructions").glob("*/report.json"))}
    if not parts:
        print(f"no Figure 4 parts under {results / 'scale_instructions'} yet")
        return None
    out = results / "figure4"
    try:
        md = merge_parts(parts, out, links={n: f"../scale_instructions/{n}/report.md" for n in parts})
    except ValueError as exc:  # parts sampled on different machines: their rows are not paired
        print(f"Figure 4 not put together: {exc}")
        return None
    (out / "report.md").write_text(md + _todo("scale_instructions", set(parts)))
    print(f"wrote {out / 'report.md'} ({', '.join(parts)})")
    return out / "report.md"


def table1(results: Path) -> Path | None:
    parts, links = {}, {}
    for path in sorted((results / "compare_objectives").glob("table1*/report.json")):
        report = json.loads(path.read_text())
        name = (report["test"].get("generator") or {}).get("name", "policy")
        parts[name], links[name] = report, str(path.parent.relative_to(results) / "report.md")
    if not parts:
        print(f"no Table 1 parts under {results / 'compare_objectives'} yet")
        return None
    parts = dict(sorted(parts.items(), key=lambda kv: kv[0] != "policy"))  # the policy's column first
    baselines = results / "compare_baselines" / "report.json"  # Math-Shepherd's rows, where it has run
    extra = json.loads(baselines.read_text()) if baselines.exists() else None
    md = table1_markdown(parts, links, baselines=extra, baselines_link="compare_baselines/report.md")
    md += _todo("compare_objectives", {Path(x).parent.name for x in links.values()}, prefix="table1")
    out = results / "table1.md"
    out.write_text(md)
    print(f"wrote {out} ({', '.join(parts)})")
    return out


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "docs" / "results" / "paper"))
    results = Path(parser.parse_args(argv).results)
    return [p for p in (table1(results), figure4(results)) if p is not None]


if __name__ == "__main__":
    main()
