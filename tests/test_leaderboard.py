"""eval.leaderboard: row selection, the table and the checkpoints.md markers (no sampling)."""
import pytest

from eval import leaderboard as lb


def test_rows_cover_every_shipped_generator_once():
    import zoo

    shipped = {f"{n}:{t}" for n in zoo.list_models("generator/*", pretrained=True)
               for t in zoo.registry.entry(n).weights if t == "shapes"}
    assert {r.generator for r in lb.ROWS} == shipped
    assert len({r.key for r in lb.ROWS}) == len(lb.ROWS)


def test_table_marks_bars_and_missing_rows():
    rows = lb.ROWS[:2]
    res = {rows[1].key: {"class_accuracy": 0.5, "colour_accuracy": 0.9, "none_or_many": 0.1, "shapes_fid": 12.3,
                         "img_per_s": 4.0, "params": 2.1e6, "num": 2000,
                         "forward_steps": 15}}
    t = lb.table(rows, res)
    assert "not measured" in t.splitlines()[2]
    assert "**50.0%**" in t and "≥ 90% **not met**" in t and "| 12.30 | 2000 | 15 | 4.00 |" in t


def test_write_between_markers(tmp_path):
    f = tmp_path / "c.md"
    f.write_text(f"a\n{lb.START}\nold\n{lb.END}\nb\n")
    lb.write_between_markers(f, "new")
    assert f.read_text() == f"a\n{lb.START}\nnew\n{lb.END}\nb\n"
    f.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        lb.write_between_markers(f, "x")
