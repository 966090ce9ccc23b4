"""tools/profile_generate.py: one generate call's self time per op group, per variant."""
import json

from tools import profile_generate


def test_tiny_profile_groups_every_op_and_states_the_bound(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile_generate.main(["--size", "tiny", "--resolution", "64", "--variants", "var,mvar", "--top", "4",
                                  "--json", str(out)]) == 0
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"var", "mvar"}
    for r in results.values():
        assert abs(sum(r["groups"].values()) - r["self_s"]) < 1e-9 and r["wall_s"] > 0
        assert r["groups"]["linear"] > 0 and r["groups"]["attention"] > 0 and r["groups"]["sampling"] > 0
        assert len(r["top"]) == 4 and r["top"][0]["self_s"] >= r["top"][-1]["self_s"]
    text = capsys.readouterr().out
    assert "| linear |" in text and "mvar: self time" in text and "(the bound if attention were free)" in text


def test_unknown_variant_is_one_line_before_any_work(capsys):
    assert profile_generate.main(["--variants", "var,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tools.profile_generate: error: --variants: unknown ['nope']") and err.count("\n") == 1
