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


def test_rows_outside_only_keep_their_cached_result_and_command(tmp_path, monkeypatch):
    import json

    a, b = lb.ROWS[0], lb.ROWS[1]
    metrics = {"class_accuracy": 0.9, "colour_accuracy": 0.9, "none_or_many": 0.0, "shapes_fid": 5.0,
               "img_per_s": 1.0, "params": 1e6, "num": 2000, "forward_steps": 64}
    monkeypatch.setattr(lb, "ensure_ref", lambda p: p)
    monkeypatch.setattr(lb, "measure", lambda r, **kw: {**metrics, "num": kw["num"], "shapes_fid": 7.0})
    lb.main(["--out", str(tmp_path), "--only", a.key, "--num", "2000"])
    doc = tmp_path / "c.md"
    doc.write_text(f"{lb.START}\n{lb.END}\n")
    # a second run at another N for another row: row a keeps its N=2000 result, both commands are listed
    lb.main(["--out", str(tmp_path), "--only", b.key, "--num", "300", "--write", str(doc)])
    text = doc.read_text()
    assert f"--only {a.key} --num 2000" in text and f"--only {b.key} --num 300" in text
    assert "| 2000 |" in text and "| 300 |" in text
    saved = json.loads((tmp_path / f"{a.key}.json").read_text())
    assert saved["ident"]["num"] == 2000


def test_candidate_is_measured_in_place_of_the_shipped_weights_without_touching_their_cache(tmp_path, monkeypatch):
    import json

    row = lb.ROWS[-1]
    folder = tmp_path / "run-final"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"name": row.generator.split(":")[0]}))
    (folder / "model.safetensors").write_bytes(b"candidate")
    seen = []
    monkeypatch.setattr(lb, "ensure_ref", lambda p: p)
    monkeypatch.setattr(lb, "measure", lambda r, **kw: seen.append(r.generator) or {
        "class_accuracy": 0.8, "colour_accuracy": 0.9, "none_or_many": 0.0, "shapes_fid": 9.0, "img_per_s": 1.0,
        "params": 1e6, "num": kw["num"], "forward_steps": 20})
    out = tmp_path / "lb"
    lb.main(["--out", str(out), "--candidate", f"{row.key}={folder}", "--num", "60"])
    assert seen == [str(folder)]  # only the candidate row was sampled, from the folder
    assert not (out / f"{row.key}.json").exists()  # the shipped row's cache is untouched
    cached = list((out / "candidates").glob(f"{row.key}-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["ident"]["row"]["generator"] == str(folder)
    short = row.generator.split(":")[0].split("/")[-1]  # "himar-tiny", as --only takes it
    lb.main(["--out", str(out), "--candidate", f"{short}={folder}", "--num", "60"])
    assert seen == [str(folder)]  # the second run is served from the candidate cache
    with pytest.raises(SystemExit, match="cannot --write"):
        lb.main(["--out", str(out), "--candidate", f"{row.key}={folder}", "--write", str(tmp_path / "c.md")])
    with pytest.raises(SystemExit, match="the row is"):
        lb.main(["--out", str(out), "--candidate", f"{lb.ROWS[0].key}={folder}"])
    with pytest.raises(SystemExit, match="ROW=FOLDER"):
        lb.main(["--out", str(out), "--candidate", f"no-such-row={folder}"])
