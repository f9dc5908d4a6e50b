"""eval.prefix_recon on a random-init ordered tokenizer (fast)."""
import json

import pytest

from eval import prefix_recon


def test_prefix_table_has_every_power_of_two(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert prefix_recon.main(["--tokenizer", "tokenizer/flextok-tiny", "--images", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["prefixes"]
    assert list(res) == ["1", "2", "4", "8", "16", "32"]
    assert all("psnr" in r and "objects" in r["attribute_agreement"] for r in res.values())
    assert "| prefix k | 1 | 2 | 4 | 8 | 16 | 32 |" in capsys.readouterr().out


def test_prefix_table_refuses_grid_tokenizers():
    with pytest.raises(SystemExit, match="not an ordered tokenizer"):
        prefix_recon.main(["--tokenizer", "tokenizer/vq-tiny", "--images", "2"])
