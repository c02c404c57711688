"""The demo report's claims rules, on constructed results (no training)."""

from __future__ import annotations

from fusion_vlm.demo.report import claims, difference_table


def _results(vqq: float, vq_ft: float, vq: float, n: int, desc: tuple[float, float, float] = (50, 50, 50)):
    out = {}
    for mode, acc, d in (("vqq", vqq, desc[0]), ("vq_ft", vq_ft, desc[1]), ("vq", vq, desc[2])):
        for big_n in (1, 2, 4, 8):
            out[(mode, big_n)] = {"attribute": {"accuracy": acc, "n": n}, "description": {"accuracy": d, "n": n}}
    return out


def _line(lines, prefix):
    (line,) = [x for x in lines if x.startswith(prefix)]
    return line


def test_question_fusion_claim_needs_more_than_two_standard_errors():
    # 3 points apart on 95 questions: 2 SE of the mean over N=1,2,4 is 2*sqrt(3 * (40*60 + 37*63) / 95) / 3 = 8.1
    line = _line(claims(_results(40, 37, 37, 95), {}, [1, 2, 4, 8]), "(b) Localized family 'attribute'")
    assert "vqq - vq_ft = +3.0 +- 8.1 points" in line and line.endswith("noise? not distinguishable from noise.")
    # the same 3 points on 100x the questions clear the bar; a clear loss is a "no"
    assert _line(claims(_results(40, 37, 37, 9500), {}, [1, 2, 4]), "(b)").endswith("noise? yes.")
    assert _line(claims(_results(40, 60, 37, 95), {}, [1, 2, 4]), "(b)").endswith("noise? no.")


def test_global_description_claim_sign_rule():
    seen = _line(claims(_results(50, 50, 50, 400, desc=(30, 60, 55)), {}, [1, 2, 4]), "(c)")
    assert "vqq - vq_ft = -30.0" in seen and "COCO): seen here" in seen
    flat = _line(claims(_results(50, 50, 50, 400, desc=(50, 52, 50)), {}, [1, 2, 4]), "(c)")
    assert "COCO): not seen here" in flat


def _yes_no(vqq, vq_ft, vq):
    return {(mode, n): {"existence": {"accuracy": acc, "n": 240}}
            for mode, accs in (("vqq", vqq), ("vq_ft", vq_ft), ("vq", vq)) for n, acc in zip((1, 4, 16), accs)}


def test_yes_no_line_names_the_lowest_cell_and_needs_the_margin():
    base = {"existence": 0.5}
    ok = _line(claims(_yes_no((62, 70, 68), (60, 58, 61), (56, 57, 59)), {}, [1, 4, 16], base), "Yes/no")
    assert "vqq 62.0 (N=1), vq_ft 58.0 (N=4), vq 56.0 (N=1)" in ok and ok.endswith("every N? yes.")
    # 54.9 beats the majority of 50 but not by more than 5 points
    low = _line(claims(_yes_no((62, 70, 68), (60, 58, 61), (54.9, 57, 59)), {}, [1, 4, 16], base), "Yes/no")
    assert low.endswith("every N? no.")
    assert not [x for x in claims(_yes_no((62, 70, 68), (60, 58, 61), (56, 57, 59)), {}, [1, 4, 16]) if "Yes/no" in x]


def test_difference_table_covers_every_family():
    res = _results(40, 37, 30, 9500)
    rows = difference_table(res, [1, 2, 4, 8])
    assert rows[0] == "| family | vqq - vq_ft | vqq - vq |"
    fams = [r.split(" | ")[0].lstrip("| ") for r in rows[2:]]
    assert fams == ["attribute", "description", "all"]
    assert rows[2].startswith("| attribute | +3.0 +- ") and " | +10.0 +- " in rows[2]
    assert rows[4] == "| all | - | - |"
