"""Model cards (zoo/card.py): written by `arzoo export`, shipped beside every checkpoint."""
import json
from pathlib import Path

import zoo
from zoo.card import CARD_NAME, model_card
from zoo.checkpoint import load_pretrained
from zoo.cli import main as arzoo

ROOT = Path(__file__).resolve().parent.parent


def test_export_writes_a_card_with_the_run(tmp_path):
    run = tmp_path / "run"
    tok = zoo.create("tokenizer/vq-tiny")
    tok.save_pretrained(run / "final")
    (run / "final" / "metrics.json").write_text(json.dumps({"psnr": 31.25, "usage": 1.0, "note": "x"}))
    (run / "args.json").write_text(json.dumps({"model": "tokenizer/vq-tiny", "steps": 1600, "lr": 0.002,
                                               "set": ["ch=16"], "overrides": {"ch": 16}, "num_objects": [1, 4],
                                               "resume": "auto", "cpu": False}))
    assert arzoo(["export", str(run / "final"), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    card = (tmp_path / "out" / CARD_NAME).read_text()
    assert card.startswith("---\nlicense: apache-2.0")
    assert "# tokenizer/vq-tiny" in card and f"{tok.num_params():,}" in card and "discrete/grid 8x8" in card
    assert "python -m train tokenizer" in card and "--steps 1600" in card and "--set ch=16" in card
    assert "--resume" not in card and "| psnr | 31.25 |" in card
    assert "--set [" not in card and card.count("--set ch=16") == 1 and "--num-objects 1-4" in card
    assert load_pretrained(tmp_path / "out").registry_name == "tokenizer/vq-tiny"  # the card does not disturb loading


def test_every_shipped_checkpoint_has_its_card():
    for d in sorted((ROOT / "weights").iterdir()):
        cfg = json.loads((d / "config.json").read_text())
        card = (d / CARD_NAME).read_text()
        assert f"# {cfg['name']}" in card, d
        if "tokenizer" in cfg:  # a generator names the tokenizer it was trained on
            assert cfg["tokenizer"]["fingerprint"] in card, d


def test_card_of_a_generator_names_its_tokenizer():
    g = zoo.create("generator/nar-tiny", pretrained="shapes")
    assert "`tokenizer/vq-tiny:shapes`" in model_card(g)


def test_export_trained_on_records_the_tokenizer(tmp_path):
    g = zoo.create("generator/nar-tiny", pretrained="shapes")
    g.trained_on = None
    g.save_pretrained(tmp_path / "run")
    assert arzoo(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--trained-on", "tokenizer/vq-tiny:shapes"]) == 0
    tok = zoo.create("tokenizer/vq-tiny", pretrained="shapes")
    assert load_pretrained(tmp_path / "out").trained_on == {"name": "tokenizer/vq-tiny:shapes",
                                                            "fingerprint": zoo.checkpoint.fingerprint(tok)}
