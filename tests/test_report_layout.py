"""The Snakemake report's layout: every reported output has a caption that exists and a numbered
category named after its checklist item (zero-padded, so the report's alphabetical menu keeps
the checklist's order); heatmaps, SSL training curves and FROC are among them."""

from __future__ import annotations

import re
from pathlib import Path

from histoflow.checklist import TITLES

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "workflow" / "rules"


def report_calls() -> list[tuple[str, str]]:
    """(rule file, text of each report(...) call), parentheses balanced."""
    calls = []
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        for match in re.finditer(r"\breport\(", text):
            depth, i = 0, match.end() - 1
            while True:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                if depth == 0:
                    break
                i += 1
            calls.append((smk.name, text[match.start():i + 1]))
    return calls


def test_every_reported_output_has_a_caption_and_a_checklist_numbered_category():
    calls = report_calls()
    assert len(calls) >= 12
    for name, call in calls:
        caption = re.search(r'caption="([^"]+)"', call)
        assert caption, f"{name}: no caption in {call}"
        assert (RULES / caption.group(1)).resolve().is_file(), f"{name}: caption {caption.group(1)} missing"
        category = re.search(r'category="(\d{2})\. ([^"]+)"', call)
        assert category, f"{name}: no numbered category (NN. Title) in {call}"
        number = int(category.group(1))
        assert number == 0 or number in TITLES, f"{name}: category {category.group(0)} is no checklist item"


def test_heatmaps_ssl_curves_and_froc_are_reported():
    reported = " ".join(call for _, call in report_calls())
    for output in ("report/heatmaps/{source}", "ssl/{arch}/training.png", "lesions/{source}/froc.png",
                   "mil/{model}/curves.png", "metrics/roc.png", "qc/slides.tsv", "checklist.md"):
        assert output in reported, f"{output} is not in the report"


def test_captions_render_no_patient_field_or_path():
    """Captions may name a slide (slide ids are exported), never a patient, a path (the job's
    input/output/params) or a config path."""
    forbidden = re.compile(r"patient|snakemake\.(input|output|params|log)\b|config\[.(samples|outdir|external)")
    for rst in (REPO / "workflow" / "report").glob("*.rst"):
        for expr in re.findall(r"{{(.*?)}}", rst.read_text(), flags=re.S):
            assert not forbidden.search(expr), f"{rst.name} renders {expr.strip()}"


def test_the_heatmap_gallery_appears_whole_and_replaces_an_old_one(tmp_path):
    from histoflow.gallery import copy_gallery

    src = tmp_path / "heatmaps" / "patch_classifier"
    src.mkdir(parents=True)
    for slide in ("S1", "S2", "S3"):
        (src / f"{slide}.png").write_bytes(slide.encode())
    out = tmp_path / "report" / "heatmaps" / "patch_classifier"
    out.mkdir(parents=True)
    (out / "OLD.png").write_bytes(b"old")
    (out.parent / f".{out.name}.partial").mkdir()        # an interrupted earlier attempt
    copies = copy_gallery([str(src / "S1.png"), str(src / "S2.png")], out)
    assert [p.name for p in copies] == ["S1.png", "S2.png"] and (out / "S2.png").read_bytes() == b"S2"
    assert sorted(p.name for p in out.parent.iterdir()) == ["patch_classifier"]
