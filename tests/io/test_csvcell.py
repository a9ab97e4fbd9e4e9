"""The one CSV cell rule: escapes and formula neutralising (OWASP CSV injection)."""

from cxrscreen.io.csvcell import safe_cell


def test_formula_cells_are_neutralised() -> None:
    for bad in ("=cmd|' /C calc'!A0", "+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"):
        assert safe_cell(bad).startswith("'"), bad
    assert safe_cell("=cmd|calc.jpg") == "'=cmd|calc.jpg"


def test_control_characters_are_escaped() -> None:
    assert safe_cell("a\nb\x1bc.png") == "a\\nb\\x1bc.png"
    assert "\n" not in safe_cell("x\r\ny") and "\r" not in safe_cell("x\r\ny")


def test_plain_values_unchanged() -> None:
    assert safe_cell("scans/a b.png") == "scans/a b.png"
    assert safe_cell(-0.5) == "-0.5" and safe_cell(3) == "3" and safe_cell(None) == ""
