"""Paper Table 1 from `make paper`'s one-study-per-generator parts: every
<results>/compare_objectives/table1*/report.json found becomes a column group of
<results>/table1.md; parts configured in configs/paper/ but not yet run are named.

    python scripts/paper_tables.py [--results docs/results/paper]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prm_ray.study.report import table1_markdown

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "docs" / "results" / "paper"))
    results = Path(parser.parse_args(argv).results)
    parts, links = {}, {}
    for path in sorted((results / "compare_objectives").glob("table1*/report.json")):
        report = json.loads(path.read_text())
        name = (report["test"].get("generator") or {}).get("name", "policy")
        parts[name], links[name] = report, str(path.parent.relative_to(results) / "report.md")
    if not parts:
        print(f"no Table 1 parts under {results / 'compare_objectives'} yet")
        return None
    parts = dict(sorted(parts.items(), key=lambda kv: kv[0] != "policy"))  # the policy's column first
    done = {Path(link).parent.name for link in links.values()}
    todo = [p.stem for p in sorted((ROOT / "configs" / "paper" / "compare_objectives").glob("table1*.yaml"))
            if p.stem not in done]
    md = table1_markdown(parts, links)
    if todo:
        md += ("\nNot yet run: " + ", ".join(f"`compare_objectives/{t}`" for t in todo)
               + " (`make paper PAPER_STUDIES=compare_objectives/<part>`).\n")
    out = results / "table1.md"
    out.write_text(md)
    print(f"wrote {out} ({', '.join(parts)})")
    return out


if __name__ == "__main__":
    main()
